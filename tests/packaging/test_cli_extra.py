"""``pip install 'peer-recovery[cli]'`` into a fresh virtualenv: ``peer-recovery doctor``
without torch, checking the example manifests (flags read without torchrun's parser,
quantities with the Kubernetes client's)."""

from __future__ import annotations

import subprocess
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "manifests" / "examples"


@pytest.mark.slow
def test_cli_extra_runs_the_doctor_without_torch(tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python, script = env_dir / "bin" / "python", env_dir / "bin" / "peer-recovery"
    install = subprocess.run([str(python), "-m", "pip", "install", "--quiet", f"{REPO}[cli]"],
                             capture_output=True, text=True, check=False)  # fmt: skip
    assert install.returncode == 0, install.stderr[-4000:]
    frozen = subprocess.run([str(python), "-m", "pip", "list", "--format=freeze"],
                            capture_output=True, text=True, check=True).stdout.lower()  # fmt: skip
    names = {line.split("==")[0] for line in frozen.splitlines()}
    assert {"peer-recovery", "pyyaml", "kubernetes"} <= names
    assert not names & {"torch", "numpy", "kopf"}, sorted(names)

    def doctor(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(script), "doctor", *args], capture_output=True, text=True,
                              timeout=120, check=False)  # fmt: skip

    usage = doctor("--help")
    assert usage.returncode == 0 and "--pod-yaml" in usage.stdout, usage.stderr
    for example in sorted(EXAMPLES.glob("*.yaml")):
        checked = doctor("--pod-yaml", str(example), "--state-bytes", "1Gi")
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert "PASS  torchrun flags" in checked.stdout and "all checks passed" in checked.stdout
    broken = tmp_path / "job.yaml"
    text = (EXAMPLES / "ddp-pytorchjob.yaml").read_text()
    broken.write_text(text.replace("--max-restarts=3", "--max-restarts=0"))
    failed = doctor("--pod-yaml", str(broken))
    assert failed.returncode == 1 and "--max-restarts is 0" in failed.stdout, failed.stdout
    bad_size = doctor("--pod-yaml", str(EXAMPLES / "ddp-pytorchjob.yaml"), "--state-bytes", "8GB!")
    assert bad_size.returncode == 2 and "'8GB!' is not a quantity" in bad_size.stderr
