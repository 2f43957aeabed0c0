"""Summarize GPU test logs (benchmarks/results/gpu_*.log, each with the header the GPU runs write:
command, commit, ``nvidia-smi`` line, versions, date) into one JSON: per log its device, versions,
commit, date, command, the pytest totals of each run in it (once each: gpu_suite.sh's console echo of
a log the file also holds is skipped; gpu_fuzz.sh's "process P seed S rc R: <pytest line>" lines are
runs), and the sweep cases checked and failing.
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
# gpu_fuzz.sh's line a run: "process 0 seed 1796336903 rc 0: <pytest's last line>".
_FUZZ_RUN = re.compile(r"^process \d+ seed \d+ rc \d+: ")
# A line naming the log file that follows it: gpu_suite.sh's gpu_tests.log and gpu_sweeps.log appended
# after its console output ("# gpu_tests.log", "== gpu_sweeps.log (every shard's log, gathered)").
_LOG_FILE_MARKER = re.compile(r"^(# |== )[\w.-]+\.log\b")
# The versions in a header: "torch 2.11.0+cu130 triton 3.6.0 transformers 5.17.0" (any order, colons
# or not), or the bare "2.11.0+cu130 3.6.0 5.17.0" (torch, triton, transformers).
_LABELED_VERSION = re.compile(r"\b(torch|triton|transformers):? (\d+(?:\.\d+)+\S*)")
_BARE_VERSIONS = re.compile(r"^\d+\.\d+\.\d+\S* \d+\.\d+\.\d+ \d+\.\d+\.\d+$")


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


def _runs(lines: list[str]) -> list[tuple[str, list[str]]]:
    """The sections of the log (:func:`_sections`), less gpu_suite.sh's console echo of a log that
    the file holds too.

    A log may hold gpu_suite.sh's console output (each shard's "== <name>" line and pytest line,
    grepped from its logs) followed by the gpu_tests.log / gpu_sweeps.log it wrote, each after a line
    naming it (``_LOG_FILE_MARKER``). A section before such a line whose name recurs after it is
    that echo: it is dropped, so each run counts once and a sweep shard's progress lines are read
    from its log. A section repeated with no log marker between is a separate run, and kept.
    """
    parts: list[list[str]] = [[]]  # the log cut before each log-file marker
    for line in lines:
        if _LOG_FILE_MARKER.match(line):
            parts.append([])
        parts[-1].append(line)
    part_sections = [_sections(part) for part in parts]
    runs: list[tuple[str, list[str]]] = []
    for index, sections in enumerate(part_sections):
        later_names = {name for later in part_sections[index + 1 :] for name, _ in later if name}
        runs += [(name, body) for name, body in sections if not (name and name in later_names)]
    return runs


def _header_versions(line: str) -> dict[str, str]:
    """The torch, triton and transformers versions a header line names (``_LABELED_VERSION`` in a line
    that starts with "torch", or ``_BARE_VERSIONS``); {} for any other line."""
    if _BARE_VERSIONS.match(line):
        return dict(zip(("torch", "triton", "transformers"), line.split()))
    if re.match(r"^torch:? \d", line):
        versions: dict[str, str] = {}
        for name, version in _LABELED_VERSION.findall(line):
            versions.setdefault(name, version.rstrip(",;"))
        return versions
    return {}


def summarize(path: str) -> dict:
    """One log's summary: its header fields, every pytest run's total line, the test shards cut
    before their summary, and per sweep the cases its shards checked and found failing."""
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
        elif _header_versions(line) and "torch" not in header:
            header.update(_header_versions(line))
        elif re.search(r"\b20\d\d$", line) and "date" not in header:
            header["date"] = line
    totals: list[str] = []
    unfinished: list[str] = []  # test shards whose log ends with no pytest summary (cut by their time limit)
    sweeps: dict[str, dict[str, int]] = {}
    for section, body in _runs(lines):
        if section.startswith("failing run "):
            continue  # gpu_fuzz.sh's whole output of a failing run: counted by its "process ... rc R:" line
        summaries = [_FUZZ_RUN.sub("", line.strip()) for line in body]
        summaries = [line for line in summaries if _PYTEST_SUMMARY.match(line)]
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
