"""operator/Dockerfile, without a Docker engine: it parses (known instructions, exec-form
entry point, a non-root numeric user last), and its own COPY, RUN and ENTRYPOINT steps,
run in a clean virtualenv standing for the image, build the wheel, install
``peer-recovery[operator]`` without torch, and start ``peer-recovery-operator``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import venv
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "operator" / "Dockerfile"
KNOWN = {"FROM", "WORKDIR", "COPY", "RUN", "ENV", "USER", "EXPOSE", "ENTRYPOINT", "CMD",
         "ARG", "LABEL"}  # fmt: skip


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    line: int


def parse(text: str) -> list[Instruction]:
    """Instructions in order: comments dropped, backslash continuations joined; an unknown
    keyword or a dangling continuation raises ValueError naming the line."""
    out: list[Instruction] = []
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        if keyword.upper() not in KNOWN or keyword != keyword.upper():
            raise ValueError(f"line {start}: unknown instruction {keyword!r}")
        out.append(Instruction(keyword, args.strip(), start))
    if pending:
        raise ValueError(f"line {start}: continuation runs past the end of the file")
    return out


def stages(instructions: list[Instruction]) -> list[list[Instruction]]:
    result: list[list[Instruction]] = []
    for ins in instructions:
        if ins.keyword == "FROM":
            result.append([])
        elif not result:
            raise ValueError(f"line {ins.line}: {ins.keyword} before FROM")
        result[-1].append(ins) if ins.keyword != "FROM" else None
    return result


def test_parser_rejects_what_docker_would() -> None:
    with pytest.raises(ValueError, match="line 2: unknown instruction 'RUNN'"):
        parse("FROM x\nRUNN echo\n")
    with pytest.raises(ValueError, match="past the end"):
        parse("FROM x\nRUN echo \\\n")
    with pytest.raises(ValueError, match="before FROM"):
        stages(parse("RUN echo\n"))


def test_dockerfile_is_small_non_root_and_runs_the_operator() -> None:
    instructions = parse(DOCKERFILE.read_text())
    build, final = stages(instructions)
    assert [i.args for i in instructions if i.keyword == "FROM"][1] == "python:3.11-slim"
    users = [i.args for i in final if i.keyword == "USER"]
    assert users == ["65532:65532"]  # numeric, so runAsNonRoot can verify it
    assert final.index(next(i for i in final if i.keyword == "USER")) > max(
        n for n, i in enumerate(final) if i.keyword == "RUN"
    )
    entry = next(i for i in final if i.keyword == "ENTRYPOINT")
    assert json.loads(entry.args) == ["peer-recovery-operator"]
    cmd = json.loads(next(i for i in final if i.keyword == "CMD").args)
    assert "--all-namespaces" in cmd
    installs = [i.args for i in final if i.keyword == "RUN"]
    assert len(installs) == 1 and "[operator]" in installs[0] and "runtime" not in installs[0]
    assert "torch" not in DOCKERFILE.read_text().split("never torch")[1]
    assert any(i.keyword == "RUN" and "pip wheel" in i.args for i in build)


@pytest.mark.slow
def test_its_steps_work_in_a_clean_virtualenv(tmp_path: Path) -> None:
    build, final = stages(parse(DOCKERFILE.read_text()))
    env_dir = tmp_path / "image"
    venv.create(env_dir, with_pip=True)
    root = tmp_path / "root"  # stands for the image's filesystem root

    def path(p: str) -> Path:
        return root / p.lstrip("/")

    env = {**os.environ, "PATH": f"{env_dir / 'bin'}:{os.environ['PATH']}", "PIP_NO_CACHE_DIR": "1"}
    env.pop("PYTHONPATH", None)

    def run_stage(stage: list, workdir: Path) -> None:
        for ins in stage:
            if ins.keyword == "WORKDIR":
                workdir = path(ins.args)
                workdir.mkdir(parents=True, exist_ok=True)
            elif ins.keyword == "COPY" and not ins.args.startswith("--from"):
                *sources, dest = ins.args.split()
                for source in sources:
                    src = REPO / source
                    target = workdir / dest if not dest.startswith("/") else path(dest)
                    if src.is_dir():
                        shutil.copytree(
                            src,
                            target / "" if dest.endswith("/") else target,
                            dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"),
                        )
                    else:
                        target.mkdir(parents=True, exist_ok=True)
                        shutil.copy(src, target)
            elif ins.keyword == "RUN":
                # Absolute paths of the image live under `root` here.
                command = ins.args.replace(" /", f" {root}/")
                result = subprocess.run(
                    ["sh", "-c", command],
                    cwd=workdir,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=600,
                    check=False,
                )
                assert result.returncode == 0, f"{command}\n{result.stderr[-4000:]}"

    run_stage(build, root)
    assert list(path("/wheels").glob("peer_recovery-*.whl")), "the build stage made no wheel"
    run_stage(final, root)  # COPY --from=build /wheels /wheels: the same directory here
    assert not path("/wheels").exists()  # the install step cleaned up
    names = subprocess.run([str(env_dir / "bin" / "python"), "-m", "pip", "list",
                            "--format=freeze"], capture_output=True, text=True, check=True,
                           env=env).stdout.lower()  # fmt: skip
    installed = {line.split("==")[0] for line in names.splitlines()}
    assert {"peer-recovery", "kopf", "kubernetes"} <= installed
    assert "torch" not in installed and "numpy" not in installed
    entry = json.loads(next(i for i in final if i.keyword == "ENTRYPOINT").args)
    cmd = json.loads(next(i for i in final if i.keyword == "CMD").args)
    help_ = subprocess.run([*entry, "--help"], env=env, capture_output=True, text=True,
                           timeout=60, check=False)  # fmt: skip
    assert help_.returncode == 0 and "--all-namespaces" in help_.stdout, help_.stderr
    # The image's default command parses and starts; with no cluster to reach, it must fail
    # at the connection, not at its flags (exit status 2).
    started = subprocess.run([*entry, *cmd, "--kubeconfig", str(tmp_path / "none")], env=env,
                             capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert started.returncode != 2, started.stderr[-2000:]
