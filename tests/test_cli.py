"""The README's main job: ``pagedllm demo`` pages a tensor through all three tiers and checks it."""

from __future__ import annotations

import io

from pagedtensor.cli import main, run_demo


def test_demo_moves_bytes_through_every_tier_and_checks_them():
    out = io.StringIO()
    assert run_demo(size=4 * 2**20, vram_limit=2**19, host_memory=2**20, page_size=2**16, device="cpu", out=out)
    text = out.getvalue()
    assert "every byte came back" in text and "yes" in text
    for label in ("bytes host→device", "bytes device→host", "bytes host→disk", "bytes disk→host", "faults", "hits"):
        assert label in text


def test_cli_entry_point(capsys):
    assert main(["demo", "--size", "1MiB", "--vram-limit", "128KiB", "--host-memory", "256KiB", "--page-size", "16KiB", "--device", "cpu"]) == 0
    assert "every byte came back" in capsys.readouterr().out
