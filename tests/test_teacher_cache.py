"""The teacher cache built in shards, one per process, assembled into one safetensors file and read
memory-mapped. (The 2-process gloo build against a 1-process one: tests/test_ddp_segmentation.py.)"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from torch import nn

from distill.errors import DataError
from distill.modules.teacher_cache import attach_teacher_cache, read_teacher_cache, shard_range, write_teacher_cache

NUM_SAMPLES = 11


class Teachers(nn.Module):
    """Two "teachers" whose (B, 2, 4, 4) logits are functions of the input; they count the slices they see."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([1.0, -2.0]))
        self.records = [SimpleNamespace(sha256="a"), SimpleNamespace(sha256="b")]
        self.slices_seen = 0

    def forward(self, x: torch.Tensor):
        self.slices_seen += x.shape[0]
        return [x[:, :2] * self.scale[k] for k in range(2)], [[]]


class Data:
    """The cache protocol over NUM_SAMPLES (1, 3, 4, 4)-stack samples, sample i filled with i / 7."""

    def __init__(self) -> None:
        self.requested: list[tuple[int, int]] = []
        self.attached: torch.Tensor | None = None

    def teacher_cache_fingerprint(self) -> dict:
        return {"samples": "s", "num_samples": NUM_SAMPLES}

    def teacher_cache_inputs(self, batch_size: int, start: int = 0, stop: int | None = None):
        stop = NUM_SAMPLES if stop is None else stop
        self.requested.append((start, stop))
        for first in range(start, stop, batch_size):
            yield torch.arange(first, min(first + batch_size, stop)).float().view(-1, 1, 1, 1).expand(-1, 3, 4, 4) / 7

    def attach_teacher_outputs(self, logits: torch.Tensor) -> None:
        self.attached = logits


class Process:
    """What attach_teacher_cache uses of a Lightning strategy: this process's rank among ``world_size``."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.global_rank, self.world_size = rank, world_size

    def broadcast(self, value, src: int = 0):
        return value

    def barrier(self, name: str | None = None) -> None:
        pass


def test_shares_cover_every_slice_once():
    for num, world in ((11, 2), (10, 3), (2, 4), (0, 2)):
        ranges = [shard_range(num, rank, world) for rank in range(world)]
        assert [i for start, stop in ranges for i in range(start, stop)] == list(range(num))


def test_each_process_computes_its_share_and_the_assembled_cache_equals_one_build(tmp_path):
    one = Data()
    attach_teacher_cache(tmp_path / "one.safetensors", one, Teachers(), batch_size=4)
    # two processes, played in turn (their barriers are no-ops here): rank 1 writes its shard first
    cache = tmp_path / "two.safetensors"
    second, second_teachers = Data(), Teachers()
    with pytest.raises(DataError, match="unreadable teacher cache"):  # rank 0 has not assembled it yet
        attach_teacher_cache(cache, second, second_teachers, batch_size=4, strategy=Process(1, 2))
    first, first_teachers = Data(), Teachers()
    attach_teacher_cache(cache, first, first_teachers, batch_size=4, strategy=Process(0, 2))
    assert (first.requested, second.requested) == ([(0, 6)], [(6, 11)])
    assert (first_teachers.slices_seen, second_teachers.slices_seen) == (6, 5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.safetensors", "two.safetensors"]  # shards removed
    assert cache.read_bytes() == (tmp_path / "one.safetensors").read_bytes()
    expected = torch.stack(Teachers()(next(Data().teacher_cache_inputs(NUM_SAMPLES)))[0], dim=1).half()
    assert first.attached.shape == (NUM_SAMPLES, 2, 2, 4, 4) and torch.equal(first.attached, expected)
    with safe_open(str(cache), framework="pt") as f:  # a safetensors file as the library writes and reads them
        assert torch.equal(f.get_tensor("logits"), expected)
    rebuilt = Data()
    attach_teacher_cache(cache, rebuilt, Teachers(), batch_size=4, strategy=Process(0, 2))
    assert rebuilt.requested == [] and torch.equal(rebuilt.attached, expected)  # read, not built again


def test_a_read_cache_is_memory_mapped_and_changing_it_never_writes_the_file(tmp_path):
    cache = tmp_path / "cache.safetensors"
    logits = torch.randn(5, 1, 2, 3, 3).half()
    write_teacher_cache(cache, logits, {"data": "x"})
    before = cache.read_bytes()
    mapped = read_teacher_cache(cache, {"data": "x"})
    assert torch.equal(mapped, logits)
    mapped.zero_()  # copy-on-write pages: the file keeps its bytes
    assert cache.read_bytes() == before and torch.equal(read_teacher_cache(cache, {"data": "x"}), logits)
    cache.write_bytes(before[:40])
    with pytest.raises(DataError, match=r"cache.safetensors: unreadable teacher cache"):
        read_teacher_cache(cache, {"data": "x"})


def test_an_old_cache_written_whole_still_reads(tmp_path: Path):
    """Caches written before the shards (safetensors' save_file of the whole tensor) read the same."""
    cache = tmp_path / "cache.safetensors"
    logits = torch.randn(4, 2, 2, 3, 3).half()
    write_teacher_cache(cache, logits, {"data": "x"})
    assert torch.equal(read_teacher_cache(cache, {"data": "x"}), logits)
