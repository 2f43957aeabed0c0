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
    totals = [line.strip() for line in lines if re.search(r"^\d+ passed|^\d+ failed", line.strip())]
    sweeps: dict[str, dict[str, int]] = {}
    name = None
    for line in lines:
        if line.startswith("== test_gpu_every"):
            name = re.sub(r"_\d+$", "", line.removeprefix("== "))
        match = re.match(r"^sweep: (\d+) of (\d+) cases, (\d+) failing", line)
        if name and match and match.group(1) == match.group(2):
            entry = sweeps.setdefault(name, {"cases": 0, "failing": 0})
            entry["cases"] += int(match.group(2))
            entry["failing"] += int(match.group(3))
    return {**header, "pytest_totals": totals, "sweeps": sweeps,
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
