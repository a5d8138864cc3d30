"""Offline distillation: a teacher-capture cache, so that the teacher runs once per distinct input.

The ``teacher_cache`` term stores, per sample, every teacher capture the other
terms read (logits, features, attention maps) in safetensors shards, and on
later epochs gives them back through ``kdhooks_teacher_forward`` instead of
running the teacher (as DistillKit and others precompute teacher logits).

Keys are content hashes: a sample's key is the BLAKE2b digest of its inputs
(every tensor argument's row, with its dtype and shape, plus the non-tensor
arguments). An augmented or otherwise changed input is a new key, so the cache
can only miss on it, never give the outputs of another input; it needs no
dataset index and no change to the loop. A batch is served from the cache only
when every sample in it hits; otherwise the teacher runs on the batch and the
missing samples are stored. The keys cost one pass of hashing over the inputs'
bytes per step, on the host.

Shards are written by each process for its own samples (``rank<r>-<n>``), with
an index per process listing each shard's digest and its entries; every index
is read at attach, each shard's digest is checked when it is first opened
(a corrupted or truncated shard is an error naming it), and a shard is read
through safetensors' memory map. Entries not yet written when a run stops are
computed again by the next run. The cache holds the taps it was filled for: a
cache filled for other taps is refused.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch

import kdhooks

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_SPEC = "spec.json"


def sample_keys(args: tuple, kwargs: dict) -> list[str] | None:
    """One content key per sample of a batch of inputs; None when no tensor argument gives a batch size."""
    tensors = [("", i, a) for i, a in enumerate(args)] + [(k, 0, v) for k, v in sorted(kwargs.items())]
    batch = next((t.shape[0] for _, _, t in tensors if isinstance(t, torch.Tensor) and t.dim() > 0), None)
    if batch is None:
        return None
    common = hashlib.blake2b(digest_size=16)
    rows = []
    for name, index, value in tensors:
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
            host = value.detach().cpu().contiguous()
            rows.append((f"{name}{index}{host.dtype}{tuple(host.shape[1:])}".encode(), host))
        elif isinstance(value, torch.Tensor):
            common.update(f"{name}{index}{value.dtype}{tuple(value.shape)}".encode())
            common.update(_bytes(value.detach().cpu().contiguous()))
        else:
            common.update(f"{name}{index}{value!r}".encode())
    keys = []
    for i in range(batch):
        key = common.copy()
        for header, host in rows:
            key.update(header)
            key.update(_bytes(host[i]))
        keys.append(key.hexdigest())
    return keys


def _bytes(tensor: torch.Tensor) -> bytes:
    # as raw bytes: numpy has no bfloat16, and a 0-dim row cannot be viewed as bytes
    return tensor.reshape(-1).view(torch.uint8).numpy().tobytes()


def _per_sample(value: Any, batch: int, where: str) -> list[Any]:
    """A batched capture as one value per sample: tensors split along dim 0, lists and tuples level by level."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 0 or value.shape[0] != batch:
            raise kdhooks.ConfigError(where, f"the teacher's capture has shape {tuple(value.shape)}, whose first "
                                      f"dimension is not the batch ({batch}): the cache stores one row per sample",
                                      fix="tap an output whose first dimension is the batch, or leave the cache out")
        return list(value.unbind(0))
    if isinstance(value, (list, tuple)):
        levels = [_per_sample(v, batch, where) for v in value]
        return [[level[i] for level in levels] for i in range(batch)]
    raise kdhooks.ConfigError(where, f"the teacher's capture is a {type(value).__name__}: the cache stores tensors "
                              f"and lists of tensors", fix="tap a tensor output, or leave the cache out")


def _batched(samples: list[Any]) -> Any:
    if isinstance(samples[0], torch.Tensor):
        return torch.stack(samples)
    return [_batched([s[level] for s in samples]) for level in range(len(samples[0]))]


class TopK(NamedTuple):
    """One sample's next-token distributions kept as their k most likely tokens and the mass of the rest.

    ``log_probs`` and ``indices`` (..., k) are the top k log-probabilities at
    temperature 1; ``tail`` (...,) the log of the remaining mass, spread evenly
    over the other ``vocab - k`` tokens when the distribution is rebuilt, so it
    stays a distribution over the whole vocabulary and every divergence is defined.
    """

    log_probs: torch.Tensor
    indices: torch.Tensor
    tail: torch.Tensor
    vocab: int

    @classmethod
    def of(cls, logits: torch.Tensor, k: int) -> TopK:
        log_probs = torch.log_softmax(logits.detach().float(), dim=-1)
        values, indices = log_probs.topk(min(k, logits.shape[-1]), dim=-1)
        rest = (1 - values.exp().sum(-1)).clamp(min=1e-12)   # never log(0): the rebuilt tokens keep some mass
        return cls(values, indices.to(torch.int32), rest.log(), logits.shape[-1])

    def dense(self) -> torch.Tensor:
        """Log-probabilities over the vocabulary (used as the teacher's logits: softmax gives them back at T = 1)."""
        others = max(self.vocab - self.log_probs.shape[-1], 1)
        fill = (self.tail.float() - torch.log(torch.tensor(float(others)))).unsqueeze(-1)
        dense = fill.expand(*self.tail.shape, self.vocab).clone()
        return dense.scatter_(-1, self.indices.long(), self.log_probs.float())


def _flat(value: Any, prefix: str) -> dict[str, torch.Tensor]:
    if isinstance(value, TopK):
        return {f"{prefix}.v": value.log_probs, f"{prefix}.i": value.indices, f"{prefix}.t": value.tail}
    if isinstance(value, torch.Tensor):
        return {prefix: value}
    return {name: t for i, v in enumerate(value) for name, t in _flat(v, f"{prefix}.{i}").items()}


def _read_layout(handle: Any, prefix: str, layout: Any) -> Any:
    if layout == "t":
        return handle.get_tensor(prefix)
    if isinstance(layout, dict):
        return TopK(handle.get_tensor(f"{prefix}.v"), handle.get_tensor(f"{prefix}.i"),
                    handle.get_tensor(f"{prefix}.t"), layout["topk"])
    return [_read_layout(handle, f"{prefix}.{i}", sub) for i, sub in enumerate(layout)]


def _layout(value: Any) -> Any:
    if isinstance(value, TopK):
        return {"topk": value.vocab}
    return "t" if isinstance(value, torch.Tensor) else [_layout(v) for v in value]


def _dense(value: Any) -> Any:
    if isinstance(value, TopK):
        return value.dense()
    return value if isinstance(value, torch.Tensor) else [_dense(v) for v in value]


def teacher_fingerprint(teacher: torch.nn.Module) -> str:
    """A digest of the teacher's weights and buffers (each one's name, shape, dtype, sum and sum of squares).

    Computed where the weights are, one host read: a cache filled by another
    teacher (other weights, another checkpoint) must not serve this one.
    """
    names, sums = [], []
    for name, tensor in [*teacher.named_parameters(), *teacher.named_buffers()]:
        names.append(f"{name}{tuple(tensor.shape)}{tensor.dtype}")
        values = tensor.detach().double()
        sums.append(torch.stack([values.sum(), values.square().sum()]).cpu() if values.numel() else torch.zeros(2))
    digest = hashlib.blake2b("|".join(names).encode(), digest_size=16)
    if sums:
        digest.update(torch.cat(sums).numpy().tobytes())
    return digest.hexdigest()


def _digest(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_atomically(path: Path, text: str) -> None:
    # a temporary of each writer's own: every DDP rank writes the shared spec, and with one name for all a
    # rank's replace could move another's temporary away before that one's replace (FileNotFoundError)
    temporary = path.with_name(f"{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


class TeacherCache(kdhooks.Term):
    """Offline distillation (teacher outputs precomputed once, as in DistillKit): a per-sample teacher-capture cache.

    ``path`` is the cache's folder; ``dtype`` the precision captures are stored
    in (``fp32`` keeps losses identical; ``bf16``/``fp16`` halve the bytes);
    ``shard_size`` the samples per shard file; ``top_k`` keeps only the k most
    likely tokens of the teacher's logits (taps on ``logits``) and the mass of
    the rest, spread evenly over the other tokens when read back: exact for the
    top k at T = 1, an approximation for the tail and at other temperatures
    (docs/benchmarks.md measures the loss's error). Adds no loss; logs the step's
    ``hit_rate``, the cache's ``samples`` and the shards' ``bytes_per_sample``
    as metrics.
    """

    path: str
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    shard_size: kdhooks.PositiveInt = 1024
    top_k: kdhooks.PositiveInt | None = None

    def configure(self, distiller: kdhooks.Distiller) -> None:
        self._distiller = distiller
        self._root = Path(self.path)
        self._root.mkdir(parents=True, exist_ok=True)
        self._rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        self._entries: dict[str, tuple[str, str]] = {}      # key -> (shard, layout json)
        self._shards: dict[str, str] = {}                   # shard -> digest
        self._open: dict[str, Any] = {}
        self._by_id: dict[str, kdhooks.Tap] | None = None  # the teacher's taps by a stable id (see _teacher_taps)
        self._layouts: dict[str, dict[str, Any]] = {}       # key -> {tap id: layout}, parsed when first read
        self._pending: dict[str, dict[str, Any]] = {}       # key -> {tap id: per-sample value}
        self._keys: list[str] = []                          # this step's keys, forward after forward
        self._served: list[bool] = []
        self._hits = self._lookups = 0
        self._stored_bytes = self._stored_samples = 0
        self._written = sum(1 for _ in self._root.glob(f"rank{self._rank}-*.safetensors"))
        self._seen: dict[Path, float] = {}                  # other processes' index files, by modification time
        self._refresh(own=True)
        distiller.on_close(self.flush)

    def _refresh(self, own: bool = False) -> None:
        """Read the index files written since last read: other processes' samples (DDP) become hits here too."""
        for index in sorted(self._root.glob("index-rank*.json")):
            if index.name == f"index-rank{self._rank}.json" and not own:
                continue
            stamp = index.stat().st_mtime_ns
            if self._seen.get(index) == stamp:
                continue
            self._seen[index] = stamp
            data = json.loads(index.read_text())
            self._shards.update(data["shards"])
            self._entries.update({k: tuple(v) for k, v in data["entries"].items()})

    def loss(self, ctx: kdhooks.LossContext) -> dict[str, torch.Tensor]:
        if ctx.evaluating:
            return {}  # adds no loss, and its bookkeeping is the training steps'
        taps = self._teacher_taps()
        served = all(self._served) if self._served else True
        if self._keys and not served:
            captures = {tap_id: ctx[tap] for tap_id, tap in taps.items()}
            batch = len(self._keys)
            per_sample = {tap_id: _per_sample(value, batch, self.location) for tap_id, value in captures.items()}
            for i, key in enumerate(self._keys):
                if key not in self._entries and key not in self._pending:
                    self._pending[key] = {tap_id: TopK.of(values[i], self.top_k)
                                          if self.top_k and taps[tap_id].wants_logits else values[i]
                                          for tap_id, values in per_sample.items()}
            if len(self._pending) >= self.shard_size:
                self.flush()
        self._keys, self._served = [], []
        if self._lookups:
            # this step's: the integrations average it over their logging interval
            ctx.log(f"{self.name}.hit_rate", self._hits / self._lookups)
        self._hits = self._lookups = 0
        ctx.log(f"{self.name}.samples", float(len(self._entries) + len(self._pending)))
        if self._stored_samples:
            ctx.log(f"{self.name}.bytes_per_sample", self._stored_bytes / self._stored_samples)
        return {}

    @kdhooks.hookimpl
    def kdhooks_teacher_forward(self, distiller: kdhooks.Distiller, role: str, args: tuple,
                                kwargs: dict) -> Any:
        if role != self.teacher_role or not distiller.student.training or distiller.is_evaluating:
            # another teacher, the dry pass (which runs the models in eval mode), or evaluation: the teacher runs,
            # and held-out samples are neither served nor stored
            return None
        keys = sample_keys(args, kwargs)
        if keys is None:
            raise kdhooks.ConfigError(self.location, "the teacher's inputs have no tensor with a batch dimension, "
                                      "so samples cannot be told apart", fix="leave teacher_cache out")
        self._keys.extend(keys)
        self._lookups += len(keys)
        hits = [key in self._entries or key in self._pending for key in keys]
        if not all(hits):
            self._refresh()   # another process may have stored them since (a few file stats)
            hits = [key in self._entries or key in self._pending for key in keys]
        self._hits += sum(hits)
        self._served.append(all(hits))
        if not all(hits):
            return None   # the teacher runs on the whole batch; loss() stores the samples it lacked
        device = next((a.device for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        # stored in `dtype`, given back in the teacher's own floating dtype
        teacher_dtype = next((p.dtype for p in distiller.model(role).parameters() if p.is_floating_point()), None)
        return kdhooks.Recorded({tap: _to(self._read_batch(keys, tap_id), device, teacher_dtype)
                                 for tap_id, tap in self._teacher_taps().items()})

    # --- storage ------------------------------------------------------------------------------

    def _teacher_taps(self) -> dict[str, kdhooks.Tap]:
        # built at the first step, once every term has declared its taps; they do not change after attach
        if self._by_id is None:
            taps = {f"{tap.role}|{tap.path}|{tap.kind}|{tap.policy}": tap for tap in self._distiller.taps
                    if tap.role == self.teacher_role and tap.kind != "param"}
            self._check_spec(taps)
            self._by_id = taps
        return self._by_id

    def _check_spec(self, taps: dict[str, kdhooks.Tap]) -> None:
        grad = [tap.path for tap in taps.values() if tap.kind == "grad"]
        if grad:
            raise kdhooks.ConfigError(self.location, f"the teacher's gradient taps {grad} depend on each step's "
                                      f"loss and cannot be cached", fix="leave teacher_cache out with grad_at")
        spec_path = self._root / _SPEC
        spec = {"taps": sorted(taps), "dtype": self.dtype, "top_k": self.top_k,
                "teacher": teacher_fingerprint(self._distiller.model(self.teacher_role))}
        if spec_path.exists() and self._entries:
            found = json.loads(spec_path.read_text())
            if found.get("teacher") != spec["teacher"]:
                raise kdhooks.ConfigError(f"{self.location}.path", f"the cache at {self.path} was filled by a teacher "
                                          f"with other weights", value=self.path,
                                          fix="use a new path for this teacher (or delete the cache)")
            if found != spec:
                raise kdhooks.ConfigError(f"{self.location}.path", f"the cache at {self.path} was filled for taps "
                                          f"{found['taps']} in {found['dtype']} (top_k {found.get('top_k')}), this "
                                          f"config reads {spec['taps']} in {spec['dtype']} (top_k {self.top_k})",
                                          value=self.path, fix="use a new path for this config")
        else:
            _write_atomically(spec_path, json.dumps(spec))

    def _read_batch(self, keys: list[str], tap_id: str) -> Any:
        return _batched([_dense(self._read(key, tap_id)) for key in keys])

    def _read(self, key: str, tap_id: str) -> Any:
        if key in self._pending:
            return self._pending[key][tap_id]
        shard, layouts = self._entries[key]
        handle = self._shard(shard)
        if key not in self._layouts:
            self._layouts[key] = json.loads(layouts)
        prefix = f"{key}|{tap_id}"
        return _read_layout(handle, prefix, self._layouts[key][tap_id])

    def _shard(self, name: str) -> Any:
        if name not in self._open:
            from safetensors import safe_open

            path = self._root / f"{name}.safetensors"
            if not path.exists() or _digest(path) != self._shards.get(name):
                raise kdhooks.LossError(self.name, self._distiller.step, problem=f"cache shard {path} is missing, "
                                        f"truncated or corrupted (its digest does not match the index)",
                                        fix=f"delete {path} and its entries' index file, or the whole cache folder")
            self._open[name] = safe_open(str(path), framework="pt", device="cpu")
        return self._open[name]

    def flush(self) -> None:
        """Write the pending samples as one shard and update this process's index."""
        if not self._pending:
            return
        from safetensors.torch import save_file

        name = f"rank{self._rank}-{self._written:05d}"
        tensors, layouts = {}, {}
        dtype = _DTYPES[self.dtype]
        for key, captures in self._pending.items():
            layouts[key] = json.dumps({tap_id: _layout(value) for tap_id, value in captures.items()})
            for tap_id, value in captures.items():
                for tensor_name, tensor in _flat(value, f"{key}|{tap_id}").items():
                    stored = tensor.detach().to("cpu", dtype if tensor.is_floating_point() else tensor.dtype)
                    tensors[tensor_name] = stored.contiguous()
        path = self._root / f"{name}.safetensors"
        temporary = path.with_suffix(".tmp")
        save_file(tensors, str(temporary))
        os.replace(temporary, path)
        self._shards[name] = _digest(path)
        self._stored_bytes += path.stat().st_size
        self._stored_samples += len(self._pending)
        for key in self._pending:
            self._entries[key] = (name, layouts[key])
        own = {k: v for k, v in self._entries.items() if v[0].startswith(f"rank{self._rank}-")}
        index = {"shards": {s: d for s, d in self._shards.items() if s.startswith(f"rank{self._rank}-")},
                 "entries": {k: list(v) for k, v in own.items()}}
        _write_atomically(self._root / f"index-rank{self._rank}.json", json.dumps(index))
        self._pending.clear()
        self._written += 1


def _to(value: Any, device: torch.device | None, dtype: torch.dtype | None) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device, dtype if dtype is not None and value.is_floating_point() else value.dtype)
    return [_to(v, device, dtype) for v in value]


@kdhooks.hookimpl
def kdhooks_register(registry: kdhooks.Registry) -> None:
    registry.add_term("teacher_cache", TeacherCache)


from ._cache_build import build_cache, register_cli  # noqa: E402,F401  (`kdhooks cache build`, re-exported)
