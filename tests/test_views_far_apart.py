"""Ops on views of one allocation whose bytes lie far apart (``torch.dot(t[0], t[-1])``,
``torch.cat([t[:4], t[-4:]])``, ``t[:4].add_(t[-4:])``) past the device tier: each run of
overlapping views gets its own window, so the op needs the pages the views reach, not the pages
between them; the result, what it writes and torch's errors are the dense op's."""

from __future__ import annotations

from typing import Callable

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pagedtensor import DeviceTierFullError, MemoryConfig, PagedTensor, Pager
from tests.support import CPU_AND_CUDA

PAGE = 4096
DEVICE_PAGES = 8
ROWS, COLUMNS = 64, 256  # 16 pages of fp32: twice the tier
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def make_pager(device: str = "cpu") -> Pager:
    return Pager(MemoryConfig(vram_limit=DEVICE_PAGES * PAGE, host_memory=256 * PAGE, page_size=PAGE, slab_size=64 * PAGE,
                              prefetch_strategy="none", device=device))  # fmt: skip


def same_bits(a: object, b: object) -> bool:
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(same_bits(x, y) for x, y in zip(a, b))
    if not isinstance(a, torch.Tensor):
        return a == b
    a = a.materialize() if isinstance(a, PagedTensor) else a
    b = b.materialize() if isinstance(b, PagedTensor) else b
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.is_floating_point:
        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return torch.equal(a.contiguous().view(bits), b.contiguous().view(bits))
    return torch.equal(a.cpu(), b.cpu())


OPS: dict[str, Callable[..., object]] = {
    "dot": lambda a, b, c: torch.dot(a[0], b[-1]),
    "cat": lambda a, b, c: torch.cat([a, b, c]),
    "stack": lambda a, b, c: torch.stack([a, c]),
    "equal": lambda a, b, c: torch.equal(a, b),
    "mm": lambda a, b, c: a @ b.T,
    "add": lambda a, b, c: a + b * c,
    "where": lambda a, b, c: torch.where(a > 0, b, c),
    "add_": lambda a, b, c: a.add_(b),
    "mul_ by a row": lambda a, b, c: a.mul_(b[0]),
    "cumsum out=": lambda a, b, c: torch.cumsum(a, 1, out=c),
    "sort out=": lambda a, b, c: torch.sort(b, out=(c, torch.empty(c.shape, dtype=torch.int64, device=c.device))),
    "addmm_": lambda a, b, c: c[:, : a.shape[0]].addmm_(a[:, :8], b[:, :8].T),
    "index_add_": lambda a, b, c: a.index_add_(0, torch.arange(b.shape[0], device=b.device).flip(0), b),
}


UNDEFINED_ON_OVERLAP = {"cumsum out=": (2, (0,)), "sort out=": (2, (1,)), "addmm_": (2, (0, 1)), "index_add_": (0, (1,))}
"""Ops that write one view (its number) from others (theirs) with no result torch defines where they
overlap (no overlap check; the kernel reads elements it already wrote): drawn apart."""


def values(dtype: torch.dtype, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if dtype == torch.int64:
        return torch.randint(-50, 50, (ROWS, COLUMNS // 2), generator=generator)
    return torch.randint(-8, 8, (ROWS, COLUMNS), generator=generator).to(dtype) / 4  # exact sums in any order


def run(op: Callable[..., object], table: torch.Tensor, starts: list[int], rows: int) -> tuple[str, object]:
    """``op`` on views ``table[start : start + rows]``: ``("ok", result)`` or ``("error", (type, message))``."""
    views = [table[start : start + rows] for start in starts]
    try:
        return "ok", op(*views)
    except RuntimeError as error:
        if isinstance(error, DeviceTierFullError):
            raise
        return "error", (type(error), str(error).removeprefix(f"PagedTensor: ").split(": ", 1)[-1])


@SETTINGS
@given(name=st.sampled_from(sorted(OPS)), dtype=st.sampled_from([torch.float32, torch.float16, torch.int64]),
       starts=st.lists(st.integers(0, ROWS - 4), min_size=3, max_size=3), rows=st.integers(1, 4), seed=st.integers(0, 99))  # fmt: skip
def test_ops_on_views_far_apart_equal_dense(name, dtype, starts, rows, seed):
    """Three views of ``rows`` rows (a page or two each; possibly the same or overlapping rows)
    of a table twice the tier: the dense op's result, the table as the dense op leaves it, and
    torch's error where torch refuses the views (an overlap of what it writes with what it reads)."""
    if dtype == torch.int64 and name in ("mm", "addmm_"):
        dtype = torch.float32
    written, read = UNDEFINED_ON_OVERLAP.get(name, (None, ()))
    if written is not None:  # torch's kernel reads what it writes there: no defined result to compare
        assume(all(abs(starts[written] - starts[other]) >= rows for other in read))
    dense = values(dtype, seed)
    with make_pager() as pager:
        paged = PagedTensor.wrap(dense.clone(), pager)
        expected = run(OPS[name], dense, starts, rows)
        got = run(OPS[name], paged, starts, rows)
        assert got[0] == expected[0], (got, expected)
        if expected[0] == "ok":
            assert same_bits(got[1], expected[1])
        else:
            assert got[1][0] is expected[1][0] and expected[1][1] in str(got[1][1]), (got, expected)
        assert same_bits(paged, dense)
        assert pager.stats()["resident_bytes"]["device"] <= DEVICE_PAGES * PAGE


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_views_at_both_ends_of_a_table_run_where_the_whole_does_not_fit(device):
    dense = torch.randn(ROWS, COLUMNS, device=device)
    with make_pager(device) as pager:
        paged = PagedTensor.wrap(dense.clone(), pager)
        assert same_bits(torch.dot(paged[0], paged[-1]), torch.dot(dense[0], dense[-1]))
        assert same_bits(torch.cat([paged[:4], paged[-4:]]), torch.cat([dense[:4], dense[-4:]]))
        assert torch.equal(paged[:4], paged[-4:]) is torch.equal(dense[:4], dense[-4:])
        torch.cumsum(paged[:4], 1, out=paged[-4:])
        torch.cumsum(dense[:4], 1, out=dense[-4:])
        assert same_bits(paged, dense)
        with pytest.raises(DeviceTierFullError):  # the views reach every page: no window smaller than the whole
            torch.dot(paged[:, 0], paged[:, -1])
        assert same_bits(paged, dense)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_an_empty_view_beside_a_view_far_from_it_reads_as_torchs_empty_tensor(device):
    """Past the tier, an empty view of a table (``t[10:10]``) beside another view of it far away: the
    window spans the other's bytes, and the empty view, given a view of the window at its offset,
    raised "invalid storage offset -7158". An empty view reaches no byte: it is an empty tensor."""
    x = torch.arange(18432, dtype=torch.float32, device=device)  # 18 pages; the tier holds 6
    calls = {"cat": lambda t: torch.cat([t[10:10], t[8000:8002], t[3:5]]),
             "sum into out": lambda t: torch.sum(t[10:10].view(0, 1), 0, out=t[8000:8001]),
             "add into an empty out": lambda t: torch.add(t[10:10], 1, out=t[8000:8000])}  # fmt: skip
    with make_pager(device) as pager:
        for name, call in calls.items():
            plain, paged = x.clone(), PagedTensor.wrap(x.clone(), pager)
            expected, got = call(plain), call(paged)
            got = got.materialize() if isinstance(got, PagedTensor) else got
            assert got.shape == expected.shape and torch.equal(got, expected), name
            assert torch.equal(paged.materialize(), plain), name
