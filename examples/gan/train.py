"""Compress a pix2pix generator (GAN Compression, Li et al. 2020) with kdhooks, in the user's own GAN loop.

    python examples/gan/train.py                              # student + recon + feature distillation
    python examples/gan/train.py --config none                # the student alone (its GAN loss only)
    python examples/gan/train.py --teacher-as-trained         # run the teacher with dropout on, as pix2pix does

The task: scikit-learn's digits (16x16) with their bottom half hidden; the
generator draws the whole digit. The loop is pix2pix's and stays the user's:
a conditional PatchGAN discriminator with its own optimizer, and the
generator's loss GAN + 100·L1 to the real image (the task loss). kdhooks adds,
from the teacher generator on the same input, the reconstruction to the
teacher's output (``recon``) and the intermediate feature distillation with a
learnable 1x1 conv per layer pair (``fitnets``): ``gan_compression.yaml``.
The teacher runs frozen, in eval mode (dropout off, BatchNorm on its running
statistics) unless ``teacher_call=as_trained()``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import kdhooks
from kdhooks.plugins.gan import as_trained

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from models import PatchCritic, UNet  # noqa: E402

BATCH = 32
L1_WEIGHT = 100.0  # pix2pix's λ


def data(seed: int = 0) -> dict[str, torch.Tensor]:
    """Digits at 16x16 in [-1, 1] (``real``), the same with the bottom half hidden (``masked``), and labels."""
    from kdhooks.demo import digits_tensors

    x_train, y_train, x_val, y_val = digits_tensors(seed, test_fraction=0.25)
    sets = {}
    for split, images, labels in (("train", x_train, y_train), ("val", x_val, y_val)):
        real = F.interpolate(images, size=(16, 16), mode="bilinear", align_corners=False) * 2 - 1
        masked = real.clone()
        masked[:, :, 8:] = 0.0  # mid-grey: neither ink (1) nor background (-1)
        sets.update({f"{split}_real": real, f"{split}_masked": masked, f"{split}_labels": labels})
    return sets


def digit_classifier(sets: dict[str, torch.Tensor]):
    """A fixed classifier of 16x16 digits (logistic regression on the pixels of the real training images)."""
    from sklearn.linear_model import LogisticRegression

    classifier = LogisticRegression(max_iter=3000, C=0.5)
    classifier.fit(sets["train_real"].flatten(1).numpy(), sets["train_labels"].numpy())
    return classifier


@torch.no_grad()
def evaluate(generator: nn.Module, sets: dict[str, torch.Tensor], classifier) -> dict[str, float]:
    """Mean |G(x) − real| on the validation digits, and the fixed classifier's accuracy on G(x)."""
    was = generator.training
    generator.eval()
    fake = generator(sets["val_masked"])
    generator.train(was)
    predicted = torch.from_numpy(classifier.predict(fake.flatten(1).numpy()))
    return {"l1": float((fake - sets["val_real"]).abs().mean()),
            "accuracy": float((predicted == sets["val_labels"]).float().mean())}


def train_gan(generator: nn.Module, sets: dict[str, torch.Tensor], steps: int, seed: int,
              kd: kdhooks.Distiller | None = None, log_every: int = 0) -> nn.Module:
    """pix2pix's loop: a discriminator step, then a generator step on GAN + 100·L1; ``kd`` adds its terms."""
    torch.manual_seed(seed)
    critic = PatchCritic()
    g_parameters = [*generator.parameters(), *(kd.parameters() if kd else [])]  # + the 1x1 connectors
    g_optimizer = torch.optim.Adam(g_parameters, lr=2e-4, betas=(0.5, 0.999))
    d_optimizer = torch.optim.Adam(critic.parameters(), lr=2e-4, betas=(0.5, 0.999))
    g = torch.Generator().manual_seed(seed + 1000)
    meter = kdhooks.LossMeter()
    generator.train()
    for step in range(1, steps + 1):
        index = torch.randint(0, len(sets["train_real"]), (BATCH,), generator=g)
        x, real = sets["train_masked"][index], sets["train_real"][index]
        fake = generator(x)
        d_real, d_fake = critic(x, real), critic(x, fake.detach())
        d_loss = (F.binary_cross_entropy_with_logits(d_real, torch.ones_like(d_real))
                  + F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake))) / 2
        d_optimizer.zero_grad()
        d_loss.backward()
        d_optimizer.step()
        d_fake = critic(x, fake)
        loss = F.binary_cross_entropy_with_logits(d_fake, torch.ones_like(d_fake)) + L1_WEIGHT * F.l1_loss(fake, real)
        if kd:
            loss = kd(loss)
            meter.add(kd)
        g_optimizer.zero_grad()
        loss.backward()
        g_optimizer.step()
        if kd and log_every and step % log_every == 0:
            print(f"step {step}: D {d_loss.item():.3f}, {({k: round(v, 3) for k, v in meter.means().items()})}")
            meter.reset()
    return generator.eval()


def train_teacher(sets: dict[str, torch.Tensor], steps: int = 1500, seed: int = 0, width: int = 32) -> nn.Module:
    torch.manual_seed(seed)
    return train_gan(UNet(width), sets, steps, seed)


def train_student(teacher: nn.Module, config, sets: dict[str, torch.Tensor], steps: int = 600, seed: int = 0,
                  width: int = 8, teacher_call=None, log_every: int = 0) -> nn.Module:
    """A student with ``width`` (a quarter of the teacher's) trained in the same loop, with ``config``'s terms."""
    torch.manual_seed(seed)
    student = UNet(width)
    if not config:
        return train_gan(student, sets, steps, seed)
    with kdhooks.Distiller(student, teacher, config, example_inputs=sets["train_masked"][:2],
                           teacher_call=teacher_call) as kd:
        return train_gan(student, sets, steps, seed, kd, log_every)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(HERE / "gan_compression.yaml"), help="a kdhooks config, or 'none'")
    parser.add_argument("--teacher", default="runs/gan/teacher.pt", help="trained here if missing")
    parser.add_argument("--teacher-steps", type=int, default=1500)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--teacher-as-trained", action="store_true", help="dropout on in the teacher")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sets = data()
    classifier = digit_classifier(sets)
    path = Path(args.teacher)
    if path.exists():
        teacher = UNet(32)
        teacher.load_state_dict(torch.load(path))
    else:
        start = time.time()
        teacher = train_teacher(sets, args.teacher_steps)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(teacher.state_dict(), path)
        print(f"teacher trained in {time.time() - start:.0f} s, saved to {path}")
    teacher.eval()
    print(f"teacher: {evaluate(teacher, sets, classifier)}")
    start = time.time()
    config = None if args.config == "none" else args.config
    student = train_student(teacher, config, sets, args.steps, args.seed,
                            teacher_call=as_trained() if args.teacher_as_trained else None, log_every=100)
    print(f"student ({config or 'alone'}): {evaluate(student, sets, classifier)} after {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
