"""Issue 23: the plugin SDK (``algorithms/``, distribution ``ainode-sdk``) installs alone in a fresh
virtual environment — numpy and pydantic are all it brings — and its own tests pass there."""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

import pytest

from .peers import ROOT

pytestmark = [pytest.mark.slow]


def test_the_sdk_installs_alone_and_its_tests_pass(tmp_path: Path):
    env = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env)
    python = env / "bin" / "python"
    installed = subprocess.run([python, "-m", "pip", "install", "-q", f"{ROOT / 'algorithms'}[test]"],
                               capture_output=True, text=True, timeout=600, check=False)  # fmt: skip
    assert installed.returncode == 0, installed.stderr[-3000:]
    listed = subprocess.run([python, "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True,
                            check=True).stdout.lower()  # fmt: skip
    names = {line.split("==")[0] for line in listed.splitlines()}
    assert {"ainode-sdk", "numpy", "pydantic"} <= names
    assert not names & {"torch", "monai", "onnxruntime", "pydicom", "highdicom", "ainode", "scipy"}
    tests = str(ROOT / "algorithms" / "tests")
    tested = subprocess.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", tests], capture_output=True,
                            text=True, timeout=600, cwd=tmp_path, check=False)  # fmt: skip
    assert tested.returncode == 0, tested.stdout[-3000:] + tested.stderr[-2000:]
    assert " passed" in tested.stdout
    assert sys.executable != str(python)
