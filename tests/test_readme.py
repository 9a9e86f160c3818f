"""The README's usage code runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "the README shows usage code"
    monkeypatch.chdir(tmp_path)  # the example writes sharpness.json
    namespace: dict = {}
    for block in blocks:  # later blocks reuse names from earlier ones
        exec(compile(block, str(README), "exec"), namespace)
    assert (tmp_path / "sharpness.json").exists()
    assert namespace["r"].value >= 0
