"""The operator installs without torch: ``pip install .[operator]`` into a fresh virtualenv."""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_operator_extra_installs_without_torch(tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", f"{ROOT}[operator]"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert install.returncode == 0, install.stderr[-4000:]

    installed = subprocess.run(
        [str(python), "-m", "pip", "list", "--format=freeze"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.lower()
    names = {line.split("==")[0] for line in installed.splitlines()}
    assert "kopf" in names and "kubernetes" in names
    assert "torch" not in names, "peer-recovery[operator] must not pull torch"

    cli = subprocess.run(
        [str(env_dir / "bin" / "peer-recovery-operator"), "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert cli.returncode == 0, cli.stderr
    assert "--namespace" in cli.stdout and "--all-namespaces" in cli.stdout
    assert sys.executable != str(python)
