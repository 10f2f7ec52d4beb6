"""Every example in examples/ runs as is and prints what it shows."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYTHON_EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


@pytest.mark.parametrize("script", PYTHON_EXAMPLES, ids=lambda p: p.name)
def test_python_example_runs(script: Path, tmp_path: Path) -> None:
    env = dict(os.environ, TMPDIR=str(tmp_path))  # the folders an example makes there (fxrewrite-*) it removes
    proc = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip(), f"{script.name} printed nothing"
    left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("fxrewrite"))  # not torch's own caches
    assert not left, f"{script.name} left {left} in the temp folder"


def test_cli_example_script_runs() -> None:
    env = dict(os.environ, FXREWRITE=f"{sys.executable} -m fxrewrite")
    proc = subprocess.run(["bash", str(ROOT / "examples" / "cli_example.sh")], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "exit code: 2" in proc.stdout
    assert "layer4.1.conv2" in proc.stdout
