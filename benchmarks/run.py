"""Run every ``benchmarks/bench_*.py`` and collect their tables in one report.

Each benchmark runs in its own process (so one cannot slow or break the
next), on the CPU always and on CUDA when a GPU is present, with
``--device cpu`` / ``--device cuda``.  Its printed output (a table of ratios
measured side by side, and the lines that explain it) is copied into one
Markdown file, under a description of the machine: CPU model, cores, memory,
GPU, torch and Python versions, the git commit.

    python benchmarks/run.py                          # writes benchmarks/results.md
    python benchmarks/run.py --quick                  # smoke run: --quick to every bench that has it
    python benchmarks/run.py --only sam sharpness     # a subset (matched against the file names)
    python benchmarks/run.py --rst docs/results/benchmarks.rst   # also an RST copy for the docs

Markdown pipe tables in a benchmark's output stay tables (in the RST copy
they become ``list-table`` directives); everything else is kept verbatim in
literal blocks.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10)
        return out.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine() -> list[tuple[str, str]]:
    """What the numbers depend on, as (field, value) rows."""
    import flatness

    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        affinity = os.cpu_count() or 0
    mem = memory_gib()
    rows = [
        ("CPU", cpu_model()),
        ("cores", f"{os.cpu_count()} logical, {affinity} usable by this process; "
                  f"torch threads {torch.get_num_threads()}"),
        ("memory", f"{mem:.1f} GiB" if mem else "unknown"),
        ("GPU", ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
         if torch.cuda.is_available() else "none"),
        ("OS", platform.platform()),
        ("Python", platform.python_version()),
        ("torch", torch.__version__ + (f" (CUDA {torch.version.cuda})" if torch.version.cuda else " (CPU build)")),
        ("flatness", f"{flatness.__version__}, commit {git_commit()}"),
    ]
    try:
        load = os.getloadavg()
        rows.append(("load average at start", " / ".join(f"{v:.2f}" for v in load) + " (1 / 5 / 15 min)"))
    except OSError:  # pragma: no cover
        pass
    return rows


def supports(path: Path, flag: str) -> bool:
    return flag in path.read_text(encoding="utf-8")


def run_one(path: Path, device: str, quick: bool, timeout: float) -> dict:
    cmd = [sys.executable, str(path.relative_to(ROOT)), "--device", device]
    if quick and supports(path, "--quick"):
        cmd.append("--quick")
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        out, err, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        err, rc = f"timed out after {timeout:.0f} s", None
    return {"name": path.name, "device": device, "cmd": " ".join(cmd[1:]), "stdout": out, "stderr": err,
            "rc": rc, "seconds": time.perf_counter() - start}


# --------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------

_TABLE_ROW = re.compile(r"^\s*\|.*\|\s*$")
_SEPARATOR = re.compile(r"^\s*\|(\s*:?-{3,}:?\s*\|)+\s*$")


def blocks(text: str) -> list[tuple[str, list[str]]]:
    """Split output into ("table", rows) and ("text", lines) blocks.

    A table is a run of ``| ... |`` lines with a ``|---|`` separator row; a
    header spread over several lines above the separator is merged cell by
    cell into one header row.
    """
    out: list[tuple[str, list[str]]] = []
    text_lines: list[str] = []

    def flush_text() -> None:
        chunk = list(text_lines)
        while chunk and not chunk[0].strip():
            chunk.pop(0)
        while chunk and not chunk[-1].strip():
            chunk.pop()
        if chunk:
            out.append(("text", chunk))
        text_lines.clear()

    lines = text.rstrip().splitlines()
    i = 0
    while i < len(lines):
        if not _TABLE_ROW.match(lines[i]):
            text_lines.append(lines[i])
            i += 1
            continue
        j = i
        while j < len(lines) and _TABLE_ROW.match(lines[j]):
            j += 1
        run = lines[i:j]
        sep = next((k for k, row in enumerate(run) if k > 0 and _SEPARATOR.match(row)), None)
        if sep is None:
            text_lines.extend(run)
        else:
            flush_text()
            header = [_cells(row) for row in run[:sep]]
            if len(header) > 1 and len({len(h) for h in header}) == 1:
                merged = [" ".join(p for p in parts if p) for parts in zip(*header)]
                header_rows = ["| " + " | ".join(merged) + " |"]
            else:
                header_rows = run[sep - 1:sep]
                text_lines.extend(run[:sep - 1])
                flush_text()
            out.append(("table", [*header_rows, run[sep], *run[sep + 1:]]))
        i = j
    flush_text()
    return out


def _cells(row: str) -> list[str]:
    return [c.strip() for c in row.strip().strip("|").split("|")]


def status(r: dict) -> str:
    if r["rc"] == 0:
        return f"ok, {r['seconds']:.0f} s"
    return "timed out" if r["rc"] is None else f"FAILED (exit code {r['rc']})"


def to_markdown(rows: list[tuple[str, str]], results: list[dict], args: argparse.Namespace) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    md = ["# flatness benchmark results", "",
          f"Produced by `python benchmarks/run.py{' --quick' if args.quick else ''}` on {now}.", "",
          "| machine | |", "|---|---|"]
    md += [f"| {k} | {v} |" for k, v in rows]
    for r in results:
        md += ["", f"## {r['name']} on {r['device']}", "", f"`python {r['cmd']}` ({status(r)})", ""]
        for kind, lines in blocks(r["stdout"]):
            md += (lines if kind == "table" else ["```text", *lines, "```"]) + [""]
        if r["rc"] != 0:
            md += ["stderr (last lines):", "", "```text", *r["stderr"].rstrip().splitlines()[-15:], "```", ""]
    return "\n".join(md).rstrip() + "\n"


def to_rst(rows: list[tuple[str, str]], results: list[dict], args: argparse.Namespace) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    def list_table(header: list[str], body: list[list[str]]) -> list[str]:
        out = [".. list-table::", "   :header-rows: 1", ""]
        for row in [header, *body]:
            row = row + [""] * (len(header) - len(row))
            out.append(f"   * - {row[0] or ' '}")
            out += [f"     - {c or ' '}" for c in row[1:len(header)]]
        return out + [""]

    rst = [f"Produced by ``python benchmarks/run.py{' --quick' if args.quick else ''}`` on {now}.", ""]
    rst += list_table(["machine", ""], [[k, v] for k, v in rows])
    for r in results:
        title = f"{r['name']} on {r['device']}"
        rst += [title, "~" * len(title), "", f"``python {r['cmd']}`` ({status(r)})", ""]
        for kind, lines in blocks(r["stdout"]):
            if kind == "table":
                rst += list_table(_cells(lines[0]), [_cells(x) for x in lines[2:]])
            else:
                rst += ["::", ""] + [f"   {x}" for x in lines] + [""]
        if r["rc"] != 0:
            rst += ["stderr (last lines)::", ""] + [f"   {x}" for x in r["stderr"].rstrip().splitlines()[-15:]] + [""]
    return "\n".join(rst).rstrip() + "\n"


def write_reports(rows: list[tuple[str, str]], results: list[dict], args: argparse.Namespace) -> None:
    """The Markdown report (and the RST copy if asked) of ``results``."""
    Path(args.output).write_text(to_markdown(rows, results, args), encoding="utf-8")
    if args.rst:
        Path(args.rst).write_text(to_rst(rows, results, args), encoding="utf-8")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", default=str(HERE / "results.md"), help="Markdown report (default benchmarks/results.md)")
    ap.add_argument("--rst", help="also write the report as reStructuredText (for the docs)")
    ap.add_argument("--quick", action="store_true", help="pass --quick to every benchmark that accepts it")
    ap.add_argument("--only", nargs="+", default=None, help="run only benchmarks whose file name contains one of these")
    ap.add_argument("--devices", nargs="+", default=None, help="default: cpu, plus cuda when available")
    ap.add_argument("--timeout", type=float, default=1200, help="seconds per benchmark and device")
    args = ap.parse_args()

    benches = sorted(HERE.glob("bench_*.py"))
    if args.only:
        benches = [b for b in benches if any(o in b.name for o in args.only)]
    if not benches:
        ap.error("no benchmark matched")
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    rows = machine()
    results = []
    for bench in benches:
        for device in devices:
            print(f"running {bench.name} on {device} ...", flush=True)
            r = run_one(bench, device, args.quick, args.timeout)
            print(f"  {status(r)}", flush=True)
            results.append(r)
            # the report so far, after every benchmark: a run stopped from
            # outside (a session's time limit) keeps what has finished
            write_reports(rows, results, args)
    print(f"wrote {args.output}" + (f" and {args.rst}" if args.rst else ""))
    return 0 if all(r["rc"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
