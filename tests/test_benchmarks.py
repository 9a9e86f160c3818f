"""The benchmark scripts run end to end in their ``--quick`` mode.

A GPU session runs them once, unattended (``benchmarks/cuda_session.sh``);
a script broken by a change to the library would waste that run.  These
smoke runs check that every measurement of the script completes, not its
figures (speed is never asserted in tests).
"""

import importlib.util
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script: str, *args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        cwd=BENCHMARKS, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_scale_benchmark_quick_run_completes_every_operation():
    import torch

    # the script's operations, by name (it imports bench_memory beside it)
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location("bench_scale", BENCHMARKS / "bench_scale.py")
        bench = importlib.util.module_from_spec(spec)
        sys.modules["bench_scale"] = bench  # (its dataclass looks itself up there)
        spec.loader.exec_module(bench)
    finally:
        sys.path.remove(str(BENCHMARKS))
        sys.modules.pop("bench_scale", None)
    tokens = torch.zeros(1, 2, dtype=torch.long)
    names = list(bench.operations((tokens, tokens)))
    out = _run("bench_scale.py", "--quick")
    # the summary table: one line per operation, a figure for every size
    for name in names:
        line = next((row for row in out.splitlines() if row.startswith(f"| {name} |")), None)
        assert line is not None, f"no table row for {name!r}:\n{out}"
        assert "failed" not in line, line
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == 2 + 2 * len(bench.QUICK) + 2, line
    assert "failed" not in out, out


@pytest.mark.slow
def test_sam_benchmark_quick_run_prints_its_ratios():
    out = _run("bench_sam.py", "--quick")
    assert "failed" not in out.lower(), out
    assert "ours/plain" in out and "SAM family" in out, out


@pytest.mark.slow
def test_sharpness_lm_benchmark_quick_run_prints_both_tables():
    out = _run("bench_sharpness_lm.py", "--quick", "--step", "--keep-freed")
    rows = [line for line in out.splitlines() if line.startswith("| 0.")]
    # a ratio row and a step row for each of the two tiny models
    assert len(rows) == 4, out
    assert "THP_MEM_ALLOC_ENABLE=" in out, out
    if platform.libc_ver()[0] == "glibc":  # mallopt took both settings
        assert "mallopt keep-freed: set" in out, out
