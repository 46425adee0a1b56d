"""Teacher-output cache: the teachers' logits computed once per training slice, reused every epoch.

The cache is one ``.safetensors`` file: ``logits`` (N, K, C, H, W) float16 for the N training
samples in the DataModule's order (NaN/inf refused when written and when read), and a
fingerprint of the data (cases, slices, size, normalisation) and of the teachers (content
hashes). A cache built from other data, another size or other teachers is refused, naming the file.

The DataModule serves each slice's cached logits as ``batch["teacher_logits"]`` (B, K, C, H, W),
with the same geometric augmentation as image and label (ReLabel-style), and refuses
augmentations that cannot be applied to the cache. It is an approximation of live teachers
(the teachers see the un-augmented slice; logits are interpolated when rotated or scaled):
results tables report cached and live runs side by side.

DataModule protocol (duck-typed, so ``distill`` does not import ``data_modules``):
``teacher_cache_fingerprint() -> dict``, ``teacher_cache_inputs(batch_size) -> iterable of
(B, S, H, W) tensors``, ``attach_teacher_outputs(logits)``.
"""

from __future__ import annotations

import json
from pathlib import Path

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


def read_teacher_cache(path: Path, fingerprint: dict) -> torch.Tensor:
    """The cached logits, after checking they were built for this data and these teachers."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            stored = json.loads((f.metadata() or {}).get("fingerprint", "{}"))
            logits = f.get_tensor("logits")
    except Exception as err:  # noqa: BLE001 - any reader failure is the same user problem
        raise DataError(f"{path}: unreadable teacher cache ({type(err).__name__}); delete it to rebuild") from None
    differing = sorted(key for key in set(stored) | set(fingerprint) if stored.get(key) != fingerprint.get(key))
    if differing:
        raise DataError(
            f"{path}: teacher cache was built for other {', '.join(differing)}; "
            "delete it or point teacher_cache to a new file"
        )
    raise_if_non_finite({"logits": logits}, str(path), "cached teacher logits", "a damaged cache; delete it to rebuild")
    return logits


def attach_teacher_cache(path: str | Path, datamodule, teachers, batch_size: int, strategy=None) -> None:
    """Read (or build, on rank 0, and write) the cache at ``path`` and hand it to ``datamodule``."""
    if not all(hasattr(datamodule, name) for name in CACHE_PROTOCOL):
        raise DataError(f"teacher_cache: {type(datamodule).__name__} cannot serve cached teacher outputs")
    path = Path(path)
    data = datamodule.teacher_cache_fingerprint()
    fingerprint = {**data, "teachers": [record.sha256 for record in teachers.records]}
    if not path.exists() and (strategy is None or strategy.global_rank == 0):
        logits = compute_teacher_logits(teachers, datamodule.teacher_cache_inputs(batch_size))
        write_teacher_cache(path, logits, fingerprint)
    if strategy is not None:
        strategy.barrier("teacher_cache")
    datamodule.attach_teacher_outputs(read_teacher_cache(path, fingerprint))
