"""The ``peer-recovery`` console script; ``peer-recovery doctor`` is its one command.

``doctor`` gathers facts (I/O) and hands them to the pure checks in
:mod:`peer_recovery.doctor`: inside a pod from the pod itself (env, ``/dev/shm``'s mount,
the ServiceAccount token, SelfSubjectAccessReviews, the torchrun process's command line),
or with ``--pod-yaml`` from a manifest (a Pod, or a PyTorchJob whose every replica template
is checked). It prints one line per check, PASS / FAIL / SKIP, with the fix under each
failure, and exits 1 when any check failed (2 for bad usage or an unreadable manifest).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from peer_recovery import doctor
from peer_recovery.kube.identity import IDENTITY_ENV

__all__ = ["main"]

_TOKEN = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def _shm_in_pod(path: str = "/dev/shm") -> doctor.Shm:
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        mounts = []
    fstype = next((line.split()[2] for line in mounts if line.split()[1:2] == [path]), None)
    if fstype is None:
        return doctor.Shm(mounted=Path(path).is_dir(), memory=False, source=f"{path} (not a mount)")
    stat = os.statvfs(path)
    return doctor.Shm(True, fstype == "tmpfs", stat.f_blocks * stat.f_frsize, f"{fstype} at {path}")


def _account_from_token(token: str) -> str:
    """The ServiceAccount a (projected) token names; the token is our own, only read."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return str(claims.get("sub", "")).rsplit(":", 1)[-1]
    except (IndexError, ValueError):
        return "?"


def _torchrun_cmdline() -> list[str] | None:
    """The command line of a torchrun process in this pod (shared PID namespace of the
    container: ``kubectl exec`` lands next to it)."""
    for entry in sorted(os.listdir("/proc")):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        words = [a.decode(errors="replace") for a in argv if a]
        if any(w.endswith("torchrun") or w == "torch.distributed.run" for w in words):
            return words
    return None


def _facts_in_pod(env: dict[str, str], command: str | None) -> doctor.PodFacts:
    token, account = False, ""
    if _TOKEN.exists():
        token, account = True, _account_from_token(_TOKEN.read_text().strip())
    elif env.get("KUBECONFIG"):
        token, account = True, f"(from $KUBECONFIG {env['KUBECONFIG']})"
    rights, error = None, ""
    namespace = env.get("POD_NAMESPACE") or (
        _NAMESPACE.read_text().strip() if _NAMESPACE.exists() else ""
    )
    if token and namespace:
        try:
            from peer_recovery.contract.errors import ApiError
            from peer_recovery.kube.client import KubeRecoveryApi

            api = KubeRecoveryApi(env)
            try:
                rights = {r: api.can_i(namespace, *r) for r in doctor.RUNTIME_RIGHTS}
            finally:
                api.close()
        except (ApiError, ImportError) as exc:
            error = str(exc)
    elif token:
        error = "the namespace is unknown (POD_NAMESPACE unset, no token namespace file)"
    argv = shlex.split(command) if command else _torchrun_cmdline()
    return doctor.PodFacts(
        where="this pod",
        env={k: env[k] for k in env if k in IDENTITY_ENV or k.startswith("PET_")},
        shm=_shm_in_pod(),
        token=token,
        service_account=account,
        argv=argv,
        rights=rights,
        rights_error=error,
    )


def _print(facts: doctor.PodFacts, checks: Sequence[doctor.Check], out: TextIO) -> None:
    print(f"== {facts.where}", file=out)
    for check in checks:
        mark = {True: "PASS", False: "FAIL", None: "SKIP"}[check.ok]
        print(f"{mark}  {check.name}: {check.detail}", file=out)
        if check.ok is False and check.fix:
            print(f"      fix: {check.fix}", file=out)


def doctor_main(args: argparse.Namespace, out: TextIO) -> int:
    try:
        state = None if args.state_bytes is None else doctor.parse_quantity(args.state_bytes)
    except ValueError as error:
        print(f"peer-recovery doctor: --state-bytes: {error}", file=sys.stderr)
        return 2
    if args.pod_yaml:
        import yaml

        try:
            docs = [d for d in yaml.safe_load_all(Path(args.pod_yaml).read_text()) if d]
            all_facts = [
                f
                for d in docs
                for f in doctor.facts_from_manifest(
                    d, webhook=not getattr(args, "no_webhook", False)
                )
            ]
        except (OSError, yaml.YAMLError, ValueError, AttributeError) as error:
            print(f"peer-recovery doctor: {args.pod_yaml}: {error}", file=sys.stderr)
            return 2
        if not all_facts:
            print(f"peer-recovery doctor: {args.pod_yaml}: no Pod or PyTorchJob", file=sys.stderr)
            return 2
    else:
        all_facts = [_facts_in_pod(dict(os.environ), args.command)]
    failed = 0
    for facts in all_facts:
        checks = doctor.run_checks(facts, state_bytes=state)
        _print(facts, checks, out)
        failed += sum(1 for c in checks if c.ok is False)
    print(f"{failed} check(s) failed" if failed else "all checks passed", file=out)
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="peer-recovery", description="peer-recovery tools")
    sub = parser.add_subparsers(dest="command_name", required=True)
    doc = sub.add_parser(
        "doctor",
        help="check that this pod (or a manifest) has what peer recovery needs",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    doc.add_argument("--pod-yaml", metavar="FILE", help="check a Pod or PyTorchJob manifest")
    doc.add_argument(
        "--state-bytes",
        metavar="QUANTITY",
        help="size of one snapshot of the training state (e.g. 3Gi); /dev/shm needs twice it",
    )
    doc.add_argument(
        "--no-webhook",
        action="store_true",
        help="check an opted-in PyTorchJob as written, not as the webhook completes its pods",
    )
    doc.add_argument(
        "--command",
        metavar="CMDLINE",
        help="the pod's command line, when no torchrun process runs here to read it from",
    )
    args = parser.parse_args(argv)
    return doctor_main(args, sys.stdout)


if __name__ == "__main__":
    sys.exit(main())
