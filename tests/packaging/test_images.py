"""The images this repository builds, without a container engine (the CI machine has none):
``examples/trainer/Dockerfile`` parses, copies files that exist, installs the runtime and
runs as a numeric non-root user; its script is the user guide's DDP recipe plus pacing
only; and ``make images`` (``tools/images.sh``) builds both images with the builder it finds,
tags them with the version the chart defaults to, and, with no builder or one whose engine
is down, says so and fails."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import yaml

from tests.packaging.chart_support import CHART, REPO
from tests.packaging.test_dockerfile import parse, stages
from tests.packaging.test_recipes import recipes

TRAINER = REPO / "examples" / "trainer"
SCRIPT = REPO / "tools" / "images.sh"
VERSION = re.search(r'^version = "(.+)"$', (REPO / "pyproject.toml").read_text(), re.M)[1]  # type: ignore[index]


def test_chart_app_version_is_the_package_version() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == VERSION == chart["version"]


def test_trainer_dockerfile_installs_the_runtime_and_runs_non_root() -> None:
    build, final = stages(parse((TRAINER / "Dockerfile").read_text()))
    for ins in build + final:
        if ins.keyword == "COPY" and not ins.args.startswith("--from"):
            for source in ins.args.split()[:-1]:
                assert (REPO / source).exists(), f"COPY {source}: not in the repository"
    installs = [i.args for i in final if i.keyword == "RUN" and "pip install" in i.args]
    assert len(installs) == 1 and "[runtime]" in installs[0]
    users = [n for n, i in enumerate(final) if i.keyword == "USER"]
    assert [final[n].args for n in users] == ["65532:65532"]
    assert users[0] > max(n for n, i in enumerate(final) if i.keyword == "RUN")
    workdir = next(i.args for i in final if i.keyword == "WORKDIR")
    copied = next(i.args for i in final if i.keyword == "COPY" and "train.py" in i.args)
    assert copied.split() == ["examples/trainer/train.py", "./"]
    assert json.loads(next(i.args for i in final if i.keyword == "ENTRYPOINT")) == ["torchrun"]
    # The DDP example runs that script from the image's working directory.
    job = yaml.safe_load((REPO / "manifests" / "examples" / "ddp-pytorchjob.yaml").read_text())
    pod = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == f"ghcr.io/peer-recovery/trainer:{VERSION}"
    assert "train.py" in container["args"] and workdir == "/app"


def test_trainer_script_is_the_ddp_recipe_plus_pacing() -> None:
    lines = (TRAINER / "train.py").read_text().splitlines()
    start = lines.index("# recipe: train_ddp.py")
    kept = [line for line in lines[start:] if not line.endswith("# pacing")]
    assert "\n".join(kept) + "\n" == recipes()["train_ddp.py"]
    assert sum(line.endswith("# pacing") for line in lines) == 3


def builder_path(tmp_path: Path, builder: str | None) -> dict[str, str]:
    """An environment whose PATH has the tools images.sh uses and, at most, ``builder``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "sed", "tail", "timeout", "dirname", "env"):
        found = shutil.which(tool)
        assert found, tool
        (bin_dir / tool).symlink_to(found)
    if builder is not None:
        fake = bin_dir / "podman"
        fake.write_text(builder)
        fake.chmod(0o755)
    return {"PATH": str(bin_dir), "HOME": str(tmp_path), "LOG": str(tmp_path / "calls")}


def run_images(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120,
                          check=False)  # fmt: skip


def test_make_images_without_a_builder_says_so(tmp_path: Path) -> None:
    result = run_images(builder_path(tmp_path, None))
    assert result.returncode == 3
    assert "no container builder: none of docker, podman, nerdctl, buildah" in result.stderr
    assert result.stdout == ""


def test_make_images_with_an_engine_down_says_so(tmp_path: Path) -> None:
    # Stands for a client whose engine is not running: `info` fails, as docker's does.
    down = "#!/bin/bash\necho 'Cannot connect to the engine socket' >&2\nexit 1\n"
    result = run_images(builder_path(tmp_path, down))
    assert result.returncode == 3
    assert "podman is installed but cannot build here" in result.stderr
    assert "Cannot connect to the engine socket" in result.stderr


def test_make_images_builds_both_images_from_the_repository(tmp_path: Path) -> None:
    # Records its calls (the real builders cannot run here); builds succeed.
    recorder = '#!/bin/bash\necho "$PWD|$*" >> "$LOG"\n'
    env = builder_path(tmp_path, recorder)
    result = run_images({**env, "IMAGE_REGISTRY": "registry.example.com/ml"})
    assert result.returncode == 0, result.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls == [
        f"{REPO}|info",
        f"{REPO}|build -t registry.example.com/ml/operator:{VERSION} -f operator/Dockerfile .",
        f"{REPO}|build -t registry.example.com/ml/trainer:{VERSION} -f examples/trainer/Dockerfile .",
    ]
    assert result.stdout.split() == [
        f"registry.example.com/ml/operator:{VERSION}",
        f"registry.example.com/ml/trainer:{VERSION}",
    ]
    for dockerfile in ("operator/Dockerfile", "examples/trainer/Dockerfile"):
        assert (REPO / dockerfile).is_file()
    assert os.access(SCRIPT, os.X_OK)


def test_build_context_leaves_out_virtualenvs_and_tools() -> None:
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv", ".venv-*", ".tools", ".git"} <= set(ignored)
