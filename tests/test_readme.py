"""The README's promises: its example runs verbatim and its support table is the registry."""

import re
import subprocess
import sys
from pathlib import Path

from vscale_plugin.hf.registry import REGISTRY

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_one_call_example_runs_verbatim(tmp_path):
    (example,) = [block for block in _python_blocks() if "apply_vscale" in block]
    result = subprocess.run([sys.executable, "-c", example], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "{'mode': 'learned', 'sigma': 0.02}" in result.stdout
    assert (tmp_path / "vscale-demo" / "config.json").is_file()


def test_support_table_lists_exactly_the_registry():
    rows = re.findall(r"^\| `([a-z0-9_]+)` \|([^|]*)\|([^|]*)\|([^|]*)\|$", README.read_text(), flags=re.M)
    rows = [row for row in rows if row[0] != "model_type"]  # the header
    assert {model_type: tuple(cell.strip() for cell in cells) for model_type, *cells in rows} == {
        arch.model_type: (arch.family, arch.note, "yes" if arch.has_statistics else f"no: {arch.no_statistics}")
        for arch in REGISTRY.values()
    }
