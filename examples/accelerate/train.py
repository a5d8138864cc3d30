"""Distil the digits CNN teacher into the small student with KD + FitNets, in an Accelerate loop.

One process:                python examples/accelerate/train.py
Two processes on CPU:       accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \\
                                --mixed_precision no --dynamo_backend no examples/accelerate/train.py
                            (or: torchrun --nproc_per_node 2 examples/accelerate/train.py)
GPUs, several machines:     accelerate config; accelerate launch examples/accelerate/train.py
Two machines, no shared disk: the teacher's weights go from the main process to all (only it reads
                            --teacher); checkpoints are saved on each machine when the script finds that
                            the machines do not see one disk (--resume checks every machine has one).

`accelerate launch --cpu --num_processes 2` starts ONE process, and `--multi_gpu`
on a machine without GPUs gives a world of one unless the Accelerator is built
with cpu=True: the script prints the world size it really got.
"""
from __future__ import annotations

import argparse
import gc
import os
import uuid
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import kdhooks
from kdhooks.demo import digits_tensors, student_cnn, teacher_cnn, train
from kdhooks.integrations.accelerate import prepare

HERE = Path(__file__).parent


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(HERE / "kd_fitnets.yaml"))
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=32, help="per process")
    parser.add_argument("--gradient-accumulation-steps", type=int, default=1)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--teacher", default="runs/accelerate/teacher.pt", help="trained here if missing")
    parser.add_argument("--teacher-epochs", type=int, default=15)
    parser.add_argument("--teacher-dtype", choices=["fp32", "bf16", "fp16"], default=None)
    parser.add_argument("--checkpoint-dir", default="runs/accelerate/state")
    parser.add_argument("--resume", action="store_true", help="load_state from --checkpoint-dir first")
    parser.add_argument("--log-with", default=None, help="an accelerate tracker (tensorboard, wandb, ...)")
    return parser.parse_args()


def load_teacher(accelerator: Accelerator, path: Path, epochs: int, images: torch.Tensor,
                 labels: torch.Tensor) -> nn.Module:
    """The teacher from its checkpoint; the main process trains and saves it first if there is none.

    Only the main process reads the file: the other processes, on this machine or others (which may not
    see its disk), get the weights from it over the process group. (A large teacher is rather loaded on
    every machine from storage they all reach, e.g. a model hub.)
    """
    weights = None
    if accelerator.is_main_process:
        if not path.exists():
            torch.manual_seed(0)
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(train(teacher_cnn(), images, labels, epochs=epochs).state_dict(), path)
        weights = torch.load(path, map_location="cpu", weights_only=True)
    [weights] = broadcast_object_list([weights], from_process=0)
    teacher = teacher_cnn()
    teacher.load_state_dict(weights)
    return teacher


def shared_filesystem(accelerator: Accelerator, directory: Path) -> bool:
    """Whether every process sees a file the main process writes in ``directory`` (one disk for all machines)."""
    directory.mkdir(parents=True, exist_ok=True)
    [token] = broadcast_object_list([uuid.uuid4().hex if accelerator.is_main_process else None], from_process=0)
    marker = directory / f".shared-check-{token}"
    if accelerator.is_main_process:
        marker.write_text(token)
    accelerator.wait_for_everyone()
    sees = torch.tensor([marker.exists()], device=accelerator.device)
    shared = bool(accelerator.gather(sees).all())
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        marker.unlink()
    return shared


def check_checkpoint(accelerator: Accelerator, directory: Path) -> None:
    """Before ``load_state``: a clear error when some machine lacks the checkpoint (not a FileNotFoundError deep in it)."""
    here = (directory / "optimizer.bin").exists() and (directory / f"random_states_{accelerator.process_index}.pkl").exists()
    found = accelerator.gather(torch.tensor([here], device=accelerator.device))
    missing = [rank for rank, ok in enumerate(found.tolist()) if not ok]
    if missing:
        raise FileNotFoundError(
            f"--resume: processes {missing} do not see a complete checkpoint in {directory} (optimizer.bin, "
            "random_states_<rank>.pkl). Without a shared filesystem each machine needs its own copy: the run that "
            "saved it must have seen the same machines (this script then saves on each machine).")


def evaluate(accelerator: Accelerator, model: nn.Module, loader: DataLoader) -> float:
    """Top-1 accuracy over the whole test set, every process's share gathered."""
    was_training = model.training
    dtype = next(model.parameters()).dtype  # a teacher kept in bf16 takes bf16 images
    model.eval()
    correct = total = 0
    with torch.no_grad(), accelerator.autocast():
        for images, labels in loader:
            logits = model(images.to(dtype))
            predictions, labels = accelerator.gather_for_metrics((logits.argmax(1), labels))
            correct += (predictions == labels).sum().item()
            total += labels.numel()
    model.train(was_training)
    return correct / total


def main() -> None:
    args = arguments()
    torch.set_num_threads(1)  # one thread per process: the processes share the cores
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), log_with=args.log_with,
                              gradient_accumulation_steps=args.gradient_accumulation_steps)
    accelerator.print(f"world size: {accelerator.num_processes} "
                      f"({accelerator.distributed_type.value}, mixed precision: {accelerator.mixed_precision})")
    accelerator.init_trackers("kdhooks-digits", config=vars(args))
    checkpoints = Path(args.checkpoint_dir)
    # save_state writes the weights from the main process only: without one disk for all machines, every
    # machine's local main process writes them to its own disk (each process writes its own RNG state anyway)
    shared = shared_filesystem(accelerator, checkpoints)
    accelerator.project_configuration.save_on_each_node = not shared
    machines = accelerator.num_processes // int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    accelerator.print(f"machines: {machines}, checkpoints: {'one disk for all' if shared else 'saved on each machine'}")

    x_train, y_train, x_test, y_test = digits_tensors(seed=0)
    teacher = load_teacher(accelerator, Path(args.teacher), args.teacher_epochs, x_train, y_train)
    torch.manual_seed(1)
    student = student_cnn()
    if accelerator.device.type == "cuda":  # batch statistics over every process's batch (needs a GPU)
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)

    # the two kdhooks lines: attach (a dry pass sizes the FitNets connector), then prepare with the rest
    kd = kdhooks.Distiller(student, teacher, args.config, example_inputs=x_train[:2])
    optimizer = torch.optim.SGD([*student.parameters(), *kd.parameters()], lr=args.lr, momentum=0.9,
                                weight_decay=5e-4)
    train_loader = DataLoader(TensorDataset(x_train, y_train), batch_size=args.batch_size, shuffle=True)
    test_loader = DataLoader(TensorDataset(x_test, y_test), batch_size=256)
    student, optimizer, train_loader, test_loader, kd = prepare(
        accelerator, student, optimizer, train_loader, test_loader, kd, teacher_dtype=args.teacher_dtype)
    distiller = accelerator.unwrap_model(kd)
    if args.resume:
        check_checkpoint(accelerator, checkpoints)
        accelerator.load_state(args.checkpoint_dir)  # student, connectors, optimizer, the Distiller's step
    accelerator.print(f"teacher accuracy: {evaluate(accelerator, teacher, test_loader):.3f}")

    for epoch in range(args.epochs):
        for images, labels in train_loader:
            with accelerator.accumulate(student, kd):
                loss = kd(F.cross_entropy(student(images), labels), labels=labels)
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
        losses = ", ".join(f"{name} {value:.3f}" for name, value in distiller.last_losses.items())
        accelerator.print(f"epoch {epoch + 1}: step {distiller.step}, {losses}, "
                          f"student accuracy {evaluate(accelerator, student, test_loader):.3f}")
        accelerator.save_state(args.checkpoint_dir)

    accelerator.print(f"final student accuracy: {evaluate(accelerator, student, test_loader):.3f}")
    distiller.close()
    accelerator.end_training()


if __name__ == "__main__":
    main()
    # what main() leaves in reference cycles (accelerate's prepared DDP models among them) would be freed at
    # interpreter shutdown, where gloo's threads abort the process (SIGABRT after a finished run: 5 runs in 30
    # on two torchrun nodes, 0 in 30 with this collection)
    gc.collect()
