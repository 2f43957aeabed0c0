"""Paged generate under GPU contention: does the paged run still return the unpaged tokens?

Runs the GPU beam-search test's setting (tests/hf/test_paged_generate_gpu.py: a 2-layer fp32 Llama,
two 300-token prompts, 4 beams, 6 new tokens, the ``"pagedllm"`` attention kernels) again and again
for SECONDS, each time on a fresh model with ``enable_paging``, and counts runs whose sequences
differ from the unpaged model's. Start several at once beside a ``noise`` process (large matmuls
and pinned copies on a side stream): other processes' work delays this one's compute stream, so a
copy on the pager's side streams that is not ordered after the compute stream's work lands early.

    python3 benchmarks/generate_under_contention.py VARIANT SECONDS [OUT.json]

Variants: ``baseline`` (a device tier of 48 pages of 64 KiB: pages stream and are evicted),
``greedy`` (the same, no beams, the prompts repeated to a batch of 8), ``resident`` (4096 pages:
every page resident), ``noise``. Diagnostic ones, which change the pager to find a race's side:
``onestream`` in a name puts the pager's copies on the compute stream, ``syncall`` synchronizes every
event the pager records, ``noquery`` never takes a copy for finished (``Pager._unfinished_copies``
without ``event.query``). Prints ``VARIANT runs N bad M``, and with OUT.json writes it there with
the run's metadata (device, versions, commit, date, command).
"""

from __future__ import annotations

import sys
import tempfile
import time

import torch

sys.path.insert(0, ".")  # run from the repository root: the test's model and prompts

from benchmarks.common import write_results  # noqa: E402
from pagedtensor import enable_paging  # noqa: E402
from pagedtensor import pager as pager_module  # noqa: E402
from pagedtensor import transfer  # noqa: E402
from pagedtensor.hf import paging_state  # noqa: E402
from tests.hf import test_paged_generate_gpu as setting  # noqa: E402


def noise(seconds: float) -> None:
    """Keep the GPU busy: 8192² fp32 matmuls on the default stream, 256 MiB pinned copies both ways on another."""
    a = torch.randn(8192, 8192, device="cuda")
    host = torch.empty(256 * 2**20, dtype=torch.uint8, pin_memory=True)
    device = torch.empty_like(host, device="cuda")
    side = torch.cuda.Stream()
    end = time.time() + seconds
    while time.time() < end:
        for _ in range(4):
            a = (a @ a).clamp_(-1, 1)
        with torch.cuda.stream(side):
            device.copy_(host, non_blocking=True)
            host.copy_(device, non_blocking=True)
        torch.cuda.synchronize()


def _diagnose(variant: str) -> None:
    if "noquery" in variant:
        def unfinished(self, pages):
            return list({id(page.ready): page.ready for page in pages if page.ready is not None}.values())

        pager_module.Pager._unfinished_copies = unfinished
    if "syncall" in variant:
        record = transfer.TransferEngine.record

        def synchronized(self, stream=None):
            event = record(self, stream)
            if event is not None:
                event.synchronize()
            return event

        transfer.TransferEngine.record = synchronized


def repeat(variant: str, seconds: float) -> tuple[int, int]:
    """Generate again and again for ``seconds``; print and return how many runs there were and how
    many differed from the unpaged one."""
    _diagnose(variant)
    beams = 1 if "greedy" in variant else 4
    vram_pages = 4096 if "resident" in variant else 48
    reference, _ = setting._pair(torch.float32, seed=9, layers=2)
    ids, mask = setting._prompts(2, 300)
    if beams == 1:
        ids, mask = ids.repeat(4, 1), mask.repeat(4, 1)
    options = dict(attention_mask=mask, max_new_tokens=6, num_beams=beams, num_return_sequences=min(2, beams),
                   do_sample=False, return_dict_in_generate=True)  # fmt: skip
    expected = reference.generate(ids, **options).sequences
    end = time.time() + seconds
    runs = bad = 0
    while time.time() < end:
        _, model = setting._pair(torch.float32, seed=9, layers=2)
        with tempfile.TemporaryDirectory() as nvme:
            enable_paging(model, setting._budget(nvme, vram_pages=vram_pages, slab_pages=16), attn_implementation="pagedllm",
                          prefill_chunk_size=128)  # fmt: skip
            if "onestream" in variant:
                engine = paging_state(model).pager.engine
                engine.h2d_stream = engine.d2h_stream = torch.cuda.current_stream()
            got = model.generate(ids, **options)
            runs += 1
            if not torch.equal(got.sequences, expected):
                bad += 1
                if bad <= 2:
                    print(variant, "differs at run", runs, got.sequences[:, 300:].tolist(), flush=True)
            got.past_key_values.close()
    print(variant, "runs", runs, "bad", bad, flush=True)
    return runs, bad


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        return 2
    variant, seconds = argv[0], float(argv[1])
    if variant == "noise":
        noise(seconds)
        return 0
    runs, bad = repeat(variant, seconds)
    if len(argv) == 3:
        write_results(argv[2], {"variant": variant, "seconds": seconds, "runs": runs, "bad": bad,
                                "baseline": "the unpaged model's generate of the same inputs, in the same process"})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
