"""benchmarks/run.py: splitting a benchmark's output into tables and text, and
the Markdown / RST reports (the benchmarks themselves are not run here)."""

import argparse
import importlib.util
from pathlib import Path

import pytest

RUNNER = Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"


@pytest.fixture(scope="module")
def runner():
    spec = importlib.util.spec_from_file_location("bench_runner", RUNNER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


OUTPUT = """# device=cpu, 2 repeats

| model | method | x fwd-bwd |
|---|---|---:|
| MLP | kfac | 1.13 |
| CNN | exact | 2.50 |
model  ours ms  ratio
mlp       3.1   0.9
"""


def test_blocks_split_tables_from_text(runner):
    blocks = runner.blocks(OUTPUT)
    assert [k for k, _ in blocks] == ["text", "table", "text"]
    assert blocks[0][1] == ["# device=cpu, 2 repeats"]
    assert blocks[1][1][0] == "| model | method | x fwd-bwd |" and len(blocks[1][1]) == 4
    assert blocks[2][1] == ["model  ours ms  ratio", "mlp       3.1   0.9"]
    # a lone "|" line without a separator row is text, not a table
    assert runner.blocks("| not | a table |\nplain")[0][0] == "text"


def test_reports(runner):
    results = [
        {"name": "bench_x.py", "device": "cpu", "cmd": "benchmarks/bench_x.py --device cpu", "stdout": OUTPUT,
         "stderr": "", "rc": 0, "seconds": 3.2},
        {"name": "bench_y.py", "device": "cpu", "cmd": "benchmarks/bench_y.py --device cpu", "stdout": "",
         "stderr": "Traceback\nValueError: boom", "rc": 1, "seconds": 0.5},
    ]
    rows = [("CPU", "Test CPU"), ("GPU", "none")]
    args = argparse.Namespace(quick=False)
    md = runner.to_markdown(rows, results, args)
    assert "| CPU | Test CPU |" in md
    assert "| MLP | kfac | 1.13 |" in md  # tables stay tables
    assert "```text\nmodel  ours ms  ratio" in md  # the rest verbatim
    assert "FAILED (exit code 1)" in md and "ValueError: boom" in md
    rst = runner.to_rst(rows, results, args)
    assert ".. list-table::" in rst and "   * - MLP\n     - kfac\n     - 1.13" in rst
    assert "   model  ours ms  ratio" in rst


def test_machine_description(runner):
    fields = dict(runner.machine())
    assert {"CPU", "cores", "GPU", "torch", "Python", "flatness"} <= set(fields)
    assert fields["CPU"]


def test_quick_flag_only_where_supported(runner, tmp_path):
    with_quick = tmp_path / "bench_a.py"
    with_quick.write_text("ap.add_argument('--quick')\n")
    without = tmp_path / "bench_b.py"
    without.write_text("ap.add_argument('--repeats')\n")
    assert runner.supports(with_quick, "--quick") and not runner.supports(without, "--quick")


def test_header_over_two_lines_is_merged(runner):
    out = "| op | peak |\n|    | (MiB) |\n|----|----|\n| fwd | 20.3 |\n"
    [(kind, rows)] = runner.blocks(out)
    assert kind == "table"
    assert rows[0] == "| op | peak (MiB) |" and rows[2] == "| fwd | 20.3 |"


def test_report_is_written_after_every_benchmark(runner, tmp_path, monkeypatch):
    # The GPU session's run is stopped from outside at its time limit: what
    # finished before must already be in the report.
    calls = []

    def run_one(path, device, quick, timeout):
        if calls:
            raise KeyboardInterrupt  # the second benchmark never finishes
        calls.append(path.name)
        return {"name": path.name, "device": device, "cmd": path.name, "stdout": "| a | b |\n|---|---|\n| 1 | 2 |\n",
                "stderr": "", "rc": 0, "seconds": 1.0}

    monkeypatch.setattr(runner, "run_one", run_one)
    out = tmp_path / "report.md"
    monkeypatch.setattr("sys.argv", ["run.py", "--only", "sam", "sharpness", "--devices", "cpu", "--output", str(out)])
    with pytest.raises(KeyboardInterrupt):
        runner.main()
    assert calls and f"## {calls[0]} on cpu" in out.read_text()
