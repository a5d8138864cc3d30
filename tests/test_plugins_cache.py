"""teacher_cache: cached and uncached training agree, a changed input is a miss, a damaged shard is an error."""
import json

import pytest
import torch
import torch.nn.functional as F

import kdhooks
from kdhooks.demo import student_cnn, teacher_cnn
from kdhooks.plugins.cache import sample_keys

TERMS = [{"kind": "kd", "temperature": 4.0}, {"kind": "fitnets", "student": "stage2", "teacher": "stage2"},
         {"kind": "at", "student": ["stage1", "stage2"], "teacher": ["stage1", "stage2"]}]


@pytest.fixture
def data():
    torch.manual_seed(0)
    return torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))


def train(data, cache=None, epochs=2, batches=None, augment=None, dtype="fp32", shard_size=16):
    """Losses of a few epochs of KD + FitNets + AT, and how often the teacher ran (dry pass included)."""
    x, y = data
    torch.manual_seed(1)
    student, teacher = student_cnn(), teacher_cnn()
    runs = []
    teacher.register_forward_hook(lambda module, args, output: runs.append(True))
    terms = TERMS + ([{"kind": "teacher_cache", "path": str(cache), "dtype": dtype, "shard_size": shard_size}]
                     if cache else [])
    losses = []
    with kdhooks.Distiller(student, teacher, {"terms": terms}, example_inputs=x[:2]) as kd:
        optimizer = torch.optim.SGD([*student.parameters(), *kd.parameters()], lr=0.05)
        for epoch in range(epochs):
            for start in list(range(0, len(x), 8))[:batches]:
                inputs = x[start:start + 8] if augment is None else augment(x[start:start + 8])
                student.train()
                loss = kd(F.cross_entropy(student(inputs), y[start:start + 8]))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
        metrics = dict(kd.last_metrics)
    return losses, len(runs), metrics


def test_cached_training_equals_uncached_and_skips_the_teacher_after_epoch_one(tmp_path, data):
    plain, plain_runs, _ = train(data)
    cached, cached_runs, metrics = train(data, tmp_path / "cache")
    assert cached == plain                      # fp32: the same numbers, bit for bit
    assert plain_runs == 1 + 8 and cached_runs == 1 + 4   # dry pass + epoch 1 only
    assert metrics["teacher_cache.hit_rate"] == 1.0   # the last step of epoch 2
    again, again_runs, metrics = train(data, tmp_path / "cache")
    assert again == plain and again_runs == 1 and metrics["teacher_cache.hit_rate"] == 1.0
    shards = sorted(p.name for p in (tmp_path / "cache").glob("*.safetensors"))
    assert shards == ["rank0-00000.safetensors", "rank0-00001.safetensors"]   # 32 samples, 16 a shard


def test_bf16_storage_is_within_a_stated_tolerance(tmp_path, data):
    plain, _, _ = train(data, epochs=1)
    train(data, tmp_path / "cache", epochs=1, dtype="bf16")
    served, runs, metrics = train(data, tmp_path / "cache", epochs=1, dtype="bf16")
    assert runs == 1 and metrics["teacher_cache.hit_rate"] == 1.0
    for exact, approximate in zip(plain, served):
        assert approximate == pytest.approx(exact, rel=2e-2)   # bf16 keeps 8 bits of mantissa


def test_an_augmented_input_is_a_miss_and_the_teacher_runs(tmp_path, data):
    noise = torch.Generator().manual_seed(5)
    augment = lambda x: x + 0.01 * torch.randn(x.shape, generator=noise)  # noqa: E731
    plain, plain_runs, _ = train(data, augment=augment)
    noise.manual_seed(5)
    cached, runs, metrics = train(data, tmp_path / "cache", augment=augment)
    assert cached == plain and runs == plain_runs and metrics["teacher_cache.hit_rate"] == 0.0


def test_sample_keys_tell_inputs_apart_and_ignore_the_batch_they_come_in():
    x = torch.randn(4, 3)
    assert sample_keys((x,), {})[1:3] == sample_keys((x[1:3],), {})
    assert len(set(sample_keys((x,), {}))) == 4
    changed = x.clone()
    changed[2, 1] += 1e-6
    assert sample_keys((changed,), {})[2] != sample_keys((x,), {})[2]
    assert sample_keys((x,), {"flag": True}) != sample_keys((x,), {"flag": False})
    assert sample_keys((x.to(torch.bfloat16),), {})[0] != sample_keys((x,), {})[0]


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_shard_is_an_error_naming_it(tmp_path, data, damage):
    train(data, tmp_path / "cache", epochs=1)
    shard = tmp_path / "cache" / "rank0-00001.safetensors"
    raw = bytearray(shard.read_bytes())
    if damage == "flip":
        raw[-5] ^= 0xFF
    else:
        raw = raw[: len(raw) // 2]
    shard.write_bytes(bytes(raw))
    with pytest.raises(kdhooks.LossError, match="rank0-00001.safetensors is missing, truncated or corrupted"):
        train(data, tmp_path / "cache", epochs=1)


def test_resume_with_a_partly_filled_cache(tmp_path, data):
    plain, _, _ = train(data)
    train(data, tmp_path / "cache", epochs=1, batches=3, shard_size=8)   # 24 of 32 samples stored
    cached, runs, _ = train(data, tmp_path / "cache")
    assert cached == plain and runs == 1 + 1   # only the fourth batch of epoch 1 needs the teacher


def test_a_cache_filled_for_other_taps_is_refused(tmp_path, data):
    train(data, tmp_path / "cache", epochs=1)
    x, _ = data
    config = {"terms": [{"kind": "kd"}, {"kind": "teacher_cache", "path": str(tmp_path / "cache")}]}
    torch.manual_seed(1)
    student, teacher = student_cnn(), teacher_cnn()   # the teacher that filled it
    with pytest.raises(kdhooks.ConfigError, match="was filled for taps") as error:
        with kdhooks.Distiller(student, teacher, config, example_inputs=x[:2]) as kd:
            student.train()
            kd(student(x[:8]).sum())
    assert "new path" in error.value.fix
    assert json.loads((tmp_path / "cache" / "spec.json").read_text())["dtype"] == "fp32"


def test_gradient_taps_cannot_be_cached(tmp_path, data):
    x, y = data
    student = student_cnn()
    config = {"terms": [{"kind": "grad_at"}, {"kind": "teacher_cache", "path": str(tmp_path)}]}
    with pytest.raises(kdhooks.ConfigError, match="gradient taps"):
        with kdhooks.Distiller(student, teacher_cnn(), config, example_inputs=x[:2]) as kd:
            student.train()
            kd(F.cross_entropy(student(x[:8]), y[:8]), labels=y[:8])


def test_kdhooks_cache_build_fills_it_ahead_of_training(tmp_path, data, monkeypatch, capsys):
    from kdhooks.cli import main

    x, y = data
    (tmp_path / "cache_batches.py").write_text(
        "import torch\n"
        "def batches():\n"
        "    torch.manual_seed(0)\n"
        "    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))\n"
        "    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    config = tmp_path / "kd.yaml"
    terms = [*TERMS, {"kind": "teacher_cache", "path": str(tmp_path / "cache"), "shard_size": 16}]
    config.write_text(json.dumps({"terms": terms}))
    (tmp_path / "cache_teacher.py").write_text(
        "import torch\nfrom kdhooks.demo import student_cnn, teacher_cnn\n"
        "def teacher():\n    torch.manual_seed(1)\n    student_cnn()\n    return teacher_cnn()  # train()'s teacher\n")
    assert main(["cache", "build", str(config), "--student", "kdhooks.demo:student_cnn",
                 "--teacher", "cache_teacher:teacher", "--data", "cache_batches:batches"]) == 0
    printed = capsys.readouterr().out
    assert "MiB for 32 samples" in printed and "teacher_cache.samples 32" in printed
    plain, _, _ = train(data)
    cached, runs, metrics = train(data, tmp_path / "cache")
    assert cached == plain and runs == 1 and metrics["teacher_cache.hit_rate"] == 1.0


def test_a_cache_filled_by_another_teacher_is_refused(tmp_path, data):
    train(data, tmp_path / "cache", epochs=1)
    x, _ = data
    torch.manual_seed(7)
    student, other_teacher = student_cnn(), teacher_cnn()
    config = {"terms": [*TERMS, {"kind": "teacher_cache", "path": str(tmp_path / "cache")}]}
    with pytest.raises(kdhooks.ConfigError, match="filled by a teacher with other weights"):
        with kdhooks.Distiller(student, other_teacher, config, example_inputs=x[:2]) as kd:
            student.train()
            kd(student(x[:8]).sum())



def tiny_llama(hidden: int, seed: int, vocab: int = 512):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                        max_position_embeddings=64))


def lm_losses(cache=None, top_k=None, temperature=1.0, epochs=2):
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    tokens = torch.randint(0, 512, (8, 16))
    student, teacher = tiny_llama(16, 1), tiny_llama(32, 2)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(30)   # a trained LM is peaked; a random one is nearly flat
    terms = [{"kind": "lm_kd", "temperature": temperature}]
    if cache:
        terms.append({"kind": "teacher_cache", "path": str(cache), "top_k": top_k})
    losses = []
    with kdhooks.Distiller(student, teacher, {"terms": terms}, example_inputs={"input_ids": tokens[:2]}) as kd:
        student.train()
        for _ in range(epochs):
            for start in (0, 4):
                student(input_ids=tokens[start:start + 4])
                losses.append(kd(None).item())
    return losses


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_top_k_with_k_equal_to_the_vocabulary_is_exact(tmp_path, temperature):
    plain = lm_losses(temperature=temperature)
    cached = lm_losses(tmp_path / "cache", top_k=512, temperature=temperature)
    assert cached[2:] == pytest.approx(plain[2:], rel=1e-5)   # epoch 2, served from the cache


def test_top_k_logits_keep_lm_kd_close_and_store_k_entries_a_token(tmp_path):
    plain = lm_losses()
    cached = lm_losses(tmp_path / "cache", top_k=64)
    assert cached[:2] == plain[:2]                              # epoch 1: the teacher ran
    relative = [abs(c - p) / p for c, p in zip(cached[2:], plain[2:])]
    assert max(relative) < 0.02, relative
    from safetensors import safe_open

    shard = next((tmp_path / "cache").glob("*.safetensors"))
    with safe_open(str(shard), framework="pt") as handle:
        names = list(handle.keys())
        assert all(handle.get_tensor(n).shape[-1] == 64 for n in names if n.endswith(".v") or n.endswith(".i"))
        assert not any(handle.get_tensor(n).shape[-1] == 512 for n in names)


def test_under_the_hf_trainer_epoch_two_is_served_from_the_cache(tmp_path):
    pytest.importorskip("transformers")
    from _hf import sentiment_data, tiny_bert, training_args

    from kdhooks.integrations.hf import DistillationTrainer

    def run(cache):
        teacher = tiny_bert(2, 32, heads=4, seed=1)
        runs = []
        teacher.register_forward_hook(lambda module, args, output: runs.append(True))
        terms = [{"kind": "kd"}] + ([{"kind": "teacher_cache", "path": str(cache)}] if cache else [])
        trainer = DistillationTrainer(
            model=tiny_bert(1, 16, seed=0), teacher=teacher, kd_config={"terms": terms},
            args=training_args(tmp_path / f"out{bool(cache)}", per_device_train_batch_size=8, num_train_epochs=2,
                               logging_steps=2, learning_rate=1e-2, seed=0, data_seed=0),
            train_dataset=sentiment_data(32, seed=5))
        trainer.train()
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        hit_rates = [entry["distill/teacher_cache.hit_rate"] for entry in trainer.state.log_history
                     if "distill/teacher_cache.hit_rate" in entry]
        trainer.distiller.close()
        return losses, len(runs), hit_rates

    plain, plain_runs, _ = run(None)
    cached, cached_runs, hit_rates = run(tmp_path / "cache")
    assert cached == pytest.approx(plain, rel=1e-6)
    assert plain_runs == 1 + 8 and cached_runs == 1 + 4     # dry pass + 4 batches an epoch
    assert hit_rates[0] == 0.0 and hit_rates[-1] == 1.0


def test_under_ddp_each_rank_reads_the_samples_the_other_stored(tmp_path):
    import socket
    import subprocess
    import sys
    from pathlib import Path

    worker = Path(__file__).parent / "_cache_ddp_worker.py"
    results = {}
    for name, cache in (("plain", "-"), ("cached", str(tmp_path / "cache"))):
        folder = tmp_path / name
        folder.mkdir()
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                               "--master_port", str(port), str(worker), str(folder), cache],
                              capture_output=True, text=True, timeout=300)
        # each rank's own lines: the rank that failed first is not the one whose error comes last
        ranks = ["\n".join(line for line in done.stderr.splitlines() if line.startswith(f"[rank{r}]"))[-2000:]
                 for r in (0, 1)]
        assert done.returncode == 0, f"{name}:\n{ranks[0]}\n{ranks[1]}\n{done.stdout[-1000:]}\n{done.stderr[-1500:]}"
        results[name] = [json.loads((folder / f"rank{r}.json").read_text()) for r in (0, 1)]
    for plain, cached in zip(results["plain"], results["cached"]):
        assert cached["world"] == 2
        assert cached["losses"] == plain["losses"]
        assert plain["runs"] == 1 + 4 and cached["runs"] == 1 + 2     # epoch 2 served: the other rank's shards
        assert cached["rates"][2:] == [1.0, 1.0]


def test_writers_of_the_shared_spec_never_take_each_others_temporary(tmp_path):
    """Every DDP rank writes the cache's spec at once: each write is whole and none fails."""
    import threading

    from kdhooks.plugins.cache import _write_atomically

    path, failures = tmp_path / "spec.json", []

    def write(writer: int) -> None:
        for attempt in range(300):
            try:
                _write_atomically(path, json.dumps({"writer": writer, "attempt": attempt}))
            except OSError as error:
                failures.append(error)

    writers = [threading.Thread(target=write, args=(writer,)) for writer in range(2)]
    for thread in writers:
        thread.start()
    for thread in writers:
        thread.join()
    assert failures == []
    assert json.loads(path.read_text())["attempt"] == 299
    assert [p.name for p in tmp_path.iterdir()] == ["spec.json"]
