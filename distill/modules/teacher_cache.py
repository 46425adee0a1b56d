"""Teacher-output cache: the teachers' logits computed once per training slice, reused every epoch.

The cache is one ``.safetensors`` file: ``logits`` (N, K, C, H, W) float16 for the N training
samples in the DataModule's order (NaN/inf refused when written and when read), and a
fingerprint of the data (cases, slices, size, normalisation) and of the teachers (content
hashes). A cache built from other data, another size or other teachers is refused, naming the file.

Under DDP each process computes its share of the slices (contiguous, :func:`shard_range`) on its
own device and writes it as a shard; process 0 streams the shards into the cache file, which
every process then reads memory-mapped (:func:`read_teacher_cache`): the operating system keeps
one copy in its page cache for all of them, and a worker reads only the slices it serves.

The DataModule serves each slice's cached logits as ``batch["teacher_logits"]`` (B, K, C, H, W),
with the same geometric augmentation as image and label (ReLabel-style), and refuses
augmentations that cannot be applied to the cache. It is an approximation of live teachers
(the teachers see the un-augmented slice; logits are interpolated when rotated or scaled):
results tables report cached and live runs side by side.

DataModule protocol (duck-typed, so ``distill`` does not import ``data_modules``):
``teacher_cache_fingerprint() -> dict`` (with ``num_samples``), ``teacher_cache_inputs(batch_size,
start, stop) -> iterable of (B, S, H, W) tensors`` of samples ``start:stop``,
``attach_teacher_outputs(logits)``.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import torch

from distill.errors import DataError
from distill.modules.finite import raise_if_non_finite
from distill.utils import atomic_write

CACHE_PROTOCOL = ("teacher_cache_fingerprint", "teacher_cache_inputs", "attach_teacher_outputs")


@torch.no_grad()
def compute_teacher_logits(teachers, batches) -> torch.Tensor:
    """Run the (loaded) teachers over un-augmented input batches -> (N, K, C, H, W) float16."""
    device = next(teachers.parameters()).device
    chunks = [torch.stack(teachers(batch.to(device))[0], dim=1).half().cpu() for batch in batches]
    logits = torch.cat(chunks)
    raise_if_non_finite(
        {"logits": logits}, "teacher cache", "teacher outputs", "a teacher's logits overflow float16 or are NaN"
    )
    return logits


def write_teacher_cache(path: Path, logits: torch.Tensor, fingerprint: dict) -> None:
    """Write atomically (temporary file, then rename): a killed run never leaves a truncated cache."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as temporary:
        save_file(
            {"logits": logits.contiguous()},
            str(temporary),
            metadata={"fingerprint": json.dumps(fingerprint, sort_keys=True)},
        )


CHECK_ROWS = 256  # slices per finiteness check of a cache read: bounded memory


def shard_range(num_samples: int, rank: int, world_size: int) -> tuple[int, int]:
    """``(start, stop)``: the contiguous share of ``num_samples`` of process ``rank`` of ``world_size``."""
    per_rank = -(-num_samples // world_size)
    return min(rank * per_rank, num_samples), min((rank + 1) * per_rank, num_samples)


def shard_path(path: Path, rank: int, world_size: int) -> Path:
    return path.with_name(f".{path.name}.shard{rank}of{world_size}")


def safetensors_layout(path: Path) -> tuple[dict, int]:
    """The header of a ``.safetensors`` file and the byte offset where its data starts (the format:
    a little-endian u64 header length, the JSON header, then the tensors' bytes)."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(length)), 8 + length


def assemble_teacher_cache(path: Path, shards: list[Path], fingerprint: dict) -> None:
    """Stream the shards' logits, in order, into one ``.safetensors`` cache at ``path`` (atomically),
    holding one shard's slices in memory at most."""
    layouts = [safetensors_layout(shard) for shard in shards]
    shapes = [header["logits"]["shape"] for header, _ in layouts]
    if any(
        header["logits"]["dtype"] != "F16" or shape[1:] != shapes[0][1:] for (header, _), shape in zip(layouts, shapes)
    ):
        raise ValueError(f"teacher cache shards {shards} differ in dtype or slice shape")
    shape = [sum(s[0] for s in shapes), *shapes[0][1:]]
    size = 2 * int(np.prod(shape))
    header = {
        "__metadata__": {"fingerprint": json.dumps(fingerprint, sort_keys=True)},
        "logits": {"dtype": "F16", "shape": shape, "data_offsets": [0, size]},
    }
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with atomic_write(path) as temporary, open(temporary, "wb") as out:
        out.write(struct.pack("<Q", len(text)) + text)
        for shard, (shard_header, offset) in zip(shards, layouts):
            with open(shard, "rb") as source:
                source.seek(offset + shard_header["logits"]["data_offsets"][0])
                shutil.copyfileobj(source, out, length=16 << 20)


def read_teacher_cache(path: Path, fingerprint: dict) -> torch.Tensor:
    """The cached logits (N, K, C, H, W) float16, memory-mapped (copy-on-write: never written back),
    after checking they were built for this data and these teachers and are finite."""
    try:
        header, offset = safetensors_layout(path)
        stored = json.loads((header.get("__metadata__") or {}).get("fingerprint", "{}"))
        entry = header["logits"]
        if entry["dtype"] != "F16":
            raise TypeError(entry["dtype"])
        mapped = np.memmap(
            path, dtype=np.float16, mode="c", offset=offset + entry["data_offsets"][0], shape=tuple(entry["shape"])
        )
    except Exception as err:  # noqa: BLE001 - any reader failure is the same user problem
        raise DataError(f"{path}: unreadable teacher cache ({type(err).__name__}); delete it to rebuild") from None
    differing = sorted(key for key in set(stored) | set(fingerprint) if stored.get(key) != fingerprint.get(key))
    if differing:
        raise DataError(
            f"{path}: teacher cache was built for other {', '.join(differing)}; "
            "delete it or point teacher_cache to a new file"
        )
    logits = torch.from_numpy(mapped)
    for start in range(0, logits.shape[0], CHECK_ROWS):
        raise_if_non_finite(
            {"logits": logits[start : start + CHECK_ROWS]},
            str(path),
            "cached teacher logits",
            "a damaged cache; delete it to rebuild",
        )
    return logits


def attach_teacher_cache(path: str | Path, datamodule, teachers, batch_size: int, strategy=None) -> None:
    """Read (or build and write) the cache at ``path`` and hand it to ``datamodule``: with a
    ``strategy`` of W processes each computes its share of the slices, process 0 assembles them."""
    if not all(hasattr(datamodule, name) for name in CACHE_PROTOCOL):
        raise DataError(f"teacher_cache: {type(datamodule).__name__} cannot serve cached teacher outputs")
    path = Path(path)
    data = datamodule.teacher_cache_fingerprint()
    fingerprint = {**data, "teachers": [record.sha256 for record in teachers.records]}
    rank, world_size = (strategy.global_rank, strategy.world_size) if strategy is not None else (0, 1)
    exists = path.exists()
    if strategy is not None:
        exists = strategy.broadcast(exists, src=0)  # one decision for all, whatever the file system shows each
    if not exists:
        start, stop = shard_range(data["num_samples"], rank, world_size)
        shards = [shard_path(path, r, world_size) for r in range(world_size)]
        if stop > start:
            logits = compute_teacher_logits(teachers, datamodule.teacher_cache_inputs(batch_size, start, stop))
            write_teacher_cache(shards[rank], logits, fingerprint)
        if strategy is not None:
            strategy.barrier("teacher_cache_shards")
        if rank == 0:
            assemble_teacher_cache(path, [shard for shard in shards if shard.exists()], fingerprint)
            for shard in shards:
                shard.unlink(missing_ok=True)
    if strategy is not None:
        strategy.barrier("teacher_cache")
    datamodule.attach_teacher_outputs(read_teacher_cache(path, fingerprint))
