"""``peer-recovery doctor``: the pure checks, the example manifest, a broken one (each
missing piece named with its fix), the console script, and the permission check asked of
the real API server as the runtime's ServiceAccount."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from peer_recovery import doctor
from peer_recovery.contract import names
from peer_recovery.doctor import PodFacts, Shm

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "manifests" / "examples" / "ddp-pytorchjob.yaml"
SCRIPT = Path(sys.executable).parent / "peer-recovery"


def example() -> dict[str, Any]:
    return yaml.safe_load(EXAMPLE.read_text())


def by_name(checks: list[doctor.Check]) -> dict[str, doctor.Check]:
    return {c.name: c for c in checks}


def test_example_manifest_passes_every_check_for_every_replica() -> None:
    facts = doctor.facts_from_manifest(example())
    assert [f.where for f in facts] == ["PyTorchJob ddp Master", "PyTorchJob ddp Worker"]
    for f in facts:
        checks = doctor.run_checks(f, state_bytes=doctor.parse_quantity("4Gi"))
        assert [c.ok for c in checks] == [True, True, True, True, None, True], checks


def broken() -> dict[str, Any]:
    job = example()
    del job["metadata"]["annotations"]
    # The example's Worker template is a YAML alias of the Master's: both are broken.
    pod = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    container = pod["containers"][0]
    # Not opted in, so no webhook completes it: what is written by hand is all there is.
    container["env"] = [
        {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}
        for name, path in (("POD_NAME", "metadata.name"), ("POD_NAMESPACE", "metadata.namespace"))
    ]
    container["args"] = [
        a for a in container["args"] if not a.startswith(("--rdzv-backend", "--max-restarts"))
    ]
    container["args"] = [a.replace("--nnodes=4", "--nnodes=2:4") for a in container["args"]]
    container["volumeMounts"] = [{"name": "shm", "mountPath": "/dev/shm"}]
    pod["volumes"] = [{"name": "shm", "emptyDir": {}}]  # on disk, no size
    return job


def test_broken_manifest_names_each_missing_piece_with_its_fix() -> None:
    facts = doctor.facts_from_manifest(broken())
    assert len(facts) == 2
    checks = by_name(doctor.run_checks(facts[1], state_bytes=2**30))
    assert checks["job opted in"].ok is False
    assert 'peer-recovery: "enabled"' in checks["job opted in"].fix
    ident = checks["pod identity (downward API)"]
    assert ident.ok is False and "POD_UID" in ident.detail and "metadata.uid" in ident.fix
    assert "POD_NAME" not in ident.detail
    shm = checks["/dev/shm for snapshots"]
    assert shm.ok is False and "medium: Memory" in shm.fix and "2.00 GiB" in shm.fix
    token = checks["ServiceAccount token"]
    assert token.ok is False and "'default'" in token.detail
    flags = checks["torchrun flags"]
    assert flags.ok is False
    for piece in ("--rdzv-backend", "--max-restarts", "--nnodes is 2:4"):
        assert piece in flags.detail, flags.detail
    assert "--rdzv-id" not in flags.detail  # that one is present


def test_an_opted_in_job_is_checked_as_the_webhook_completes_it() -> None:
    written = doctor.facts_from_manifest(example(), webhook=False)[0]
    checks = by_name(doctor.run_checks(written))
    assert checks["pod identity (downward API)"].ok is False
    assert checks["/dev/shm for snapshots"].ok is False
    completed = doctor.facts_from_manifest(example())[0]
    assert completed.shm.size_bytes == doctor.parse_quantity("8Gi")  # half of limits.memory
    assert "added by the webhook" in completed.shm.source
    too_big = by_name(doctor.run_checks(completed, state_bytes=doctor.parse_quantity("5Gi")))
    assert too_big["/dev/shm for snapshots"].ok is False


def test_a_pod_that_came_through_without_the_webhook_is_named() -> None:
    pod = {
        "kind": "Pod",
        "metadata": {"name": "ddp-worker-0", "labels": {names.LABEL_JOB_NAME: "ddp"}},
        "spec": example()["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"],
    }
    check = by_name(doctor.run_checks(doctor.facts_from_manifest(pod)[0]))["webhook"]
    assert check.ok is False and "peerrecovery.io/mutated" in check.detail
    assert "delete the pod" in check.fix
    pod["metadata"]["annotations"] = {names.ANNOTATION_MUTATED: "0.1.0"}
    assert by_name(doctor.run_checks(doctor.facts_from_manifest(pod)[0]))["webhook"].ok is True
    del pod["metadata"]["labels"]  # not a PyTorchJob's pod: no webhook check
    assert "webhook" not in by_name(doctor.run_checks(doctor.facts_from_manifest(pod)[0]))


def test_shm_sizes_against_the_state() -> None:
    shm = Shm(True, True, doctor.parse_quantity("8Gi"), "memory emptyDir 'shm'")
    facts = PodFacts("p", {}, shm, True, "sa", None)
    assert doctor.check_shm(facts, doctor.parse_quantity("4Gi")).ok is True
    small = doctor.check_shm(facts, doctor.parse_quantity("5Gi"))
    assert small.ok is False and "need 10.00 GiB" in small.detail
    default = PodFacts("p", {}, Shm(True, True, 64 * 2**20, "tmpfs at /dev/shm"), True, "sa", None)
    assert doctor.check_shm(default, None).ok is False
    unsized = PodFacts("p", {}, Shm(True, True, None, "memory emptyDir 'shm'"), True, "sa", None)
    assert "no sizeLimit" in doctor.check_shm(unsized, None).detail


@pytest.mark.parametrize(
    ("command", "ok", "words"),
    [
        (["torchrun", "--rdzv-backend=peer-recovery", "--rdzv-id=j", "--nnodes=2",
          "--max-restarts=1", "train.py", "--max-restarts=0"], True, []),
        (["bash", "-c", "pip list && torchrun --rdzv_backend peer-recovery --rdzv_id j "
          "--nnodes 4:4 --max_restarts 2 train.py"], True, []),
        (["python", "-m", "torch.distributed.run", "--rdzv-backend=c10d", "--nnodes=2",
          "train.py"], False, ["--rdzv-backend is c10d", "--max-restarts is 0", "--rdzv-id"]),
        (["python", "train.py"], False, ["does not run torchrun"]),
    ],
)  # fmt: skip
def test_torchrun_flags(command: list[str], ok: bool, words: list[str]) -> None:
    check = doctor.check_torchrun(PodFacts("p", {}, Shm(False), True, "sa", command))
    assert check.ok is ok, check
    for word in words:
        assert word in check.detail
    assert not check.ok or not check.fix.startswith("x")


def test_torchrun_flags_from_pet_env() -> None:
    env = {"PET_RDZV_BACKEND": "peer-recovery", "PET_RDZV_ID": "j", "PET_NNODES": "3",
           "PET_MAX_RESTARTS": "2"}  # fmt: skip
    check = doctor.check_torchrun(PodFacts("p", env, Shm(False), True, "sa", ["torchrun", "t.py"]))
    assert check.ok is True, check


def test_quantities() -> None:
    assert doctor.parse_quantity("8Gi") == 8 * 2**30
    assert doctor.parse_quantity("2G") == 2 * 10**9
    assert doctor.parse_quantity("1e3") == 1000
    with pytest.raises(ValueError, match="not a quantity"):
        doctor.parse_quantity("eight gigs")


def run_script(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCRIPT), "doctor", *args], capture_output=True, text=True, timeout=60,
        env={**os.environ, **(env or {})}, check=False,
    )  # fmt: skip


def test_console_script_passes_the_example_and_fails_a_broken_one(tmp_path: Path) -> None:
    good = run_script("--pod-yaml", str(EXAMPLE), "--state-bytes", "3Gi")
    assert good.returncode == 0, good.stdout + good.stderr
    assert "all checks passed" in good.stdout and "FAIL" not in good.stdout
    bad_file = tmp_path / "bad.yaml"
    bad_file.write_text(yaml.safe_dump(broken()))
    bad = run_script("--pod-yaml", str(bad_file))
    assert bad.returncode == 1
    assert bad.stdout.count("FAIL") == 10 and "fix:" in bad.stdout  # 5 per replica
    unreadable = run_script("--pod-yaml", str(tmp_path / "missing.yaml"))
    assert unreadable.returncode == 2 and "missing.yaml" in unreadable.stderr


@pytest.mark.cluster
def test_in_pod_permissions_are_asked_of_the_api_server(
    control_plane: Any, namespace: str, tmp_path: Path
) -> None:
    from testbed.operator_process import CRD
    from tests.cluster_e2e.support import RUNTIME_SA, render_runtime_rbac

    control_plane.kubectl("apply", "-f", str(CRD))
    kubeconfig = control_plane.service_account_kubeconfig(namespace, RUNTIME_SA)
    env = {"KUBECONFIG": str(kubeconfig), "POD_NAME": "ddp-worker-0", "POD_UID": "u1",
           "POD_NAMESPACE": namespace}  # fmt: skip
    command = "torchrun --rdzv-backend=peer-recovery --rdzv-id=ddp --nnodes=2 --max-restarts=1 t.py"
    before = run_script("--command", command, env=env)
    assert "FAIL  ServiceAccount permissions: denied: get peerrecoveries" in before.stdout
    assert before.returncode == 1
    manifest = render_runtime_rbac(control_plane.bin_dir / "helm", "pr", namespace)
    control_plane.kubectl("apply", "-f", "-", input=manifest)
    after = run_script("--command", command, env=env)
    assert "PASS  ServiceAccount permissions" in after.stdout, after.stdout + after.stderr
    assert "PASS  torchrun flags" in after.stdout
    assert "PASS  pod identity" in after.stdout
