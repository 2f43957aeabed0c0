"""Summarize GPU test logs (benchmarks/results/gpu_*.log, each with the header the GPU runs write:
command, commit, ``nvidia-smi`` line, versions, date) into one JSON: per log its device, versions,
commit, date, command, the pytest totals of each run in it, and the sweep cases checked and failing.
The peer of every GPU test is the dense op or unpaged model run in the same test, which it asserts
equal to (or within its stated tolerance of).

Run: ``python benchmarks/gpu_log_summary.py --out FILE LOG...``
"""

from __future__ import annotations

import argparse
import json
import os
import re


# pytest's last line: "528 passed, 3 skipped in 230.10s", "2 errors in 3.10s", "5 skipped in 1.00s", "no tests ran in 0.10s".
_PYTEST_SUMMARY = re.compile(r"^(\d+ (passed|failed|errors?|skipped|deselected|xfailed|xpassed|warnings?)(, |\b)|no tests ran).* in [\d.]+s")
_SWEEP_PROGRESS = re.compile(r"^sweep: (\d+) of (\d+) cases, (\d+) failing")


def _sections(lines: list[str]) -> list[tuple[str, list[str]]]:
    """The log cut at gpu_suite.sh's "== <name>" lines (a test shard's or a sweep shard's log each),
    as ``(name, lines)``; the lines before the first are a section named ""."""
    sections: list[tuple[str, list[str]]] = [("", [])]
    for line in lines:
        if line.startswith("== "):
            sections.append((line.removeprefix("== ").strip(), []))
        else:
            sections[-1][1].append(line)
    return sections


def summarize(path: str) -> dict:
    lines = open(path, encoding="utf-8").read().splitlines()
    header = {"file": os.path.basename(path)}
    for line in lines[:12]:
        if line.startswith("command: "):
            header["command"] = line.removeprefix("command: ")
        elif line.startswith("commit: ") and line.removeprefix("commit: ").strip():
            header["commit"] = line.removeprefix("commit: ")
        elif re.match(r"^# (\w+ )?GPU \w+ on an H\d+ at ", line):  # "# GPU suite on an H100 at ...", "# Targeted GPU run on ..."
            header["note"] = line.removeprefix("# ")
        elif line.startswith("NVIDIA ") and "device" not in header:
            header["device"] = line.split(",")[0]
        elif re.match(r"^\d+\.\d+\.\d+\S* \d+\.\d+\.\d+ \d+\.\d+\.\d+$", line):
            header["torch"], header["triton"], header["transformers"] = line.split()
        elif re.search(r"\b20\d\d$", line) and "date" not in header:
            header["date"] = line
    totals: list[str] = []
    unfinished: list[str] = []  # test shards whose log ends with no pytest summary (cut by their time limit)
    sweeps: dict[str, dict[str, int]] = {}
    for section, body in _sections(lines):
        summaries = [line.strip() for line in body if _PYTEST_SUMMARY.match(line.strip())]
        totals += summaries
        if section.startswith("test shard") and not summaries:
            unfinished.append(section)
        if section.startswith("test_gpu_every"):
            # A shard's last progress line: the cases it checked and found failing, whether it
            # finished (N of N) or was cut by its time limit (counted as unfinished).
            entry = sweeps.setdefault(re.sub(r"_\d+$", "", section), {"cases": 0, "failing": 0, "unfinished_shards": 0})
            progress = [match for match in map(_SWEEP_PROGRESS.match, body) if match]
            if progress:
                entry["cases"] += int(progress[-1].group(1))
                entry["failing"] += int(progress[-1].group(3))
            if not progress or progress[-1].group(1) != progress[-1].group(2):
                entry["unfinished_shards"] += 1
    return {**header, "pytest_totals": totals, "unfinished_test_shards": unfinished, "sweeps": sweeps,
            "peers": "each test's dense op or unpaged model, run in the same test and asserted equal (or within its tolerance)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("logs", nargs="+")
    args = parser.parse_args()
    with open(args.out, "w", encoding="utf-8") as out:
        json.dump({"command": "python benchmarks/gpu_log_summary.py --out " + args.out + " " + " ".join(args.logs),
                   "runs": [summarize(path) for path in args.logs]}, out, indent=1)
        out.write("\n")


if __name__ == "__main__":
    main()
