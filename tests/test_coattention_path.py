"""`attend`'s path choice: the affinity is built whole only while the batch's fits the byte budget."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from acol_core.models import coattention_naive
from acol_core.models.coattention import AFFINITY_BUDGET_BYTES, attend, attention_path

POSITIONS_AT_BUDGET = 512  # one pair of 16×32 maps: 512 × 512 float32 = 1 MiB, the budget exactly


@pytest.mark.parametrize(
    ("batch", "positions_q", "positions_kv", "element_size", "expected"),
    [
        (1, 512, 512, 4, "materialised"),  # exactly the budget
        (1, 512, 513, 4, "sdpa"),  # 2 KiB over
        (2, 512, 512, 2, "materialised"),  # half-precision: twice the pairs fit
        (2, 512, 512, 4, "sdpa"),
        (64, 8 * 8, 8 * 8, 4, "materialised"),  # tiny backbone's 8×8 maps, a batch of 64: 1 MiB
        (1, 28 * 28, 28 * 28, 4, "sdpa"),  # vgg16 at 224 input, one pair: 2.3 MiB
        (0, 512, 512, 4, "materialised"),  # an empty batch builds nothing either way
    ],
)
def test_attention_path_by_affinity_bytes(
    batch: int, positions_q: int, positions_kv: int, element_size: int, expected: str
) -> None:
    assert AFFINITY_BUDGET_BYTES == POSITIONS_AT_BUDGET**2 * 4
    assert attention_path(batch, positions_q, positions_kv, element_size) == expected


def test_bad_sizes_and_paths_are_refused() -> None:
    with pytest.raises(ValueError, match=">= 0"):
        attention_path(-1, 4, 4)
    f = torch.zeros(1, 2, 2, 2)
    with pytest.raises(ValueError, match="path must be one of"):
        attend(f, f, torch.eye(2), path="flash")


@pytest.mark.parametrize("path", ["auto", "materialised", "sdpa"])
@pytest.mark.parametrize(
    ("shape_q", "shape_kv"), [((2, 6, 3, 5), (2, 6, 4, 2)), ((1, 4, 40, 30), (1, 4, 36, 36))]
)
def test_every_path_matches_the_naive_reference(
    path: str, shape_q: tuple[int, ...], shape_kv: tuple[int, ...]
) -> None:
    # The second case (1200 × 1296 positions, 5.9 MiB in float32) is over the budget: auto takes SDPA.
    gen = torch.Generator().manual_seed(3)
    d = shape_q[1]
    f_q = torch.randn(shape_q, generator=gen, dtype=torch.float64, requires_grad=True)
    f_kv = torch.randn(shape_kv, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = (torch.randn(d, d, generator=gen, dtype=torch.float64) / d**0.5).requires_grad_(True)
    probe = torch.randn(shape_q, generator=gen, dtype=torch.float64)
    results = []
    for out in (coattention_naive(f_q, f_kv, weight)[0], attend(f_q, f_kv, weight, path=path)):
        results.append((out, *torch.autograd.grad((out * probe).sum(), (f_q, f_kv, weight))))
    for want, got in zip(*results, strict=True):
        assert got.shape == want.shape
        assert (want - got).abs().max() <= 1e-10 * want.abs().max()


def _largest_allocation(side: int, path: str) -> int:
    f_q = torch.randn(1, 8, side, side, requires_grad=True)
    f_kv = torch.randn(1, 8, side, side, requires_grad=True)
    weight = torch.randn(8, 8, requires_grad=True)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        attend(f_q, f_kv, weight, path=path).sum().backward()
    return max(e.cpu_memory_usage for e in prof.events())


def test_auto_builds_a_small_affinity_and_tiles_a_large_one() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the flash kernel's scratch is one tile per thread
    try:
        small = 16**4 * 4  # 256 KiB: under the budget
        assert _largest_allocation(16, "sdpa") < small  # so that the next line can tell the paths apart
        assert _largest_allocation(16, "auto") >= small
        large = 40**4 * 4  # 9.8 MiB: over the budget
        assert _largest_allocation(40, "materialised") >= large
        assert _largest_allocation(40, "auto") < large / 8
    finally:
        torch.set_num_threads(threads)
