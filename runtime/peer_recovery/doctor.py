"""``peer-recovery doctor``: the checks, as pure functions of facts about a pod (no I/O).

Each check returns a :class:`Check`: passed, failed or skipped, what was seen, and the fix.
The facts come either from a manifest (:func:`facts_from_manifest`: a Pod, or each replica
template of a PyTorchJob) or from inside a running pod (``peer_recovery.cli`` gathers them:
environment, ``/dev/shm``'s mount, the ServiceAccount token, a SelfSubjectAccessReview per
right, the torchrun command line). What recovery needs (docs/design.md):

- the pod's identity through the downward API: ``POD_NAME``, ``POD_UID``, ``POD_NAMESPACE``;
- ``/dev/shm`` from a memory-backed emptyDir big enough for two snapshots;
- a ServiceAccount token whose account may get/list/watch/create PeerRecoveries and patch
  their status (the chart's runtime Role);
- torchrun with ``--rdzv-backend=peer-recovery``, ``--max-restarts`` >= 1, an explicit
  ``--rdzv-id`` and a fixed ``--nnodes`` (the plugin's own launch checks, reused).

The operator's mutating webhook adds the identity env, ``/dev/shm`` and the ServiceAccount
to the pods of opted-in jobs (docs/webhook.md). A PyTorchJob manifest that opts in is
therefore checked as the webhook will complete its pods (``webhook=False`` checks it as
written); a Pod of a PyTorchJob that lacks the webhook's ``peerrecovery.io/mutated``
annotation came through while the webhook was down, and the ``webhook`` check says so.
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final, NoReturn

from peer_recovery.contract import names
from peer_recovery.contract.annotations import AnnotationError, is_enabled, parse_job_annotations
from peer_recovery.kube.identity import IDENTITY_ENV
from peer_recovery.rendezvous.launch import launch_problems
from peer_recovery.snapshots.sizing import format_bytes

__all__ = [
    "RUNTIME_RIGHTS",
    "Check",
    "PodFacts",
    "Shm",
    "check_identity",
    "check_permissions",
    "check_shm",
    "check_token",
    "check_torchrun",
    "check_webhook",
    "facts_from_manifest",
    "parse_quantity",
    "run_checks",
    "torchrun_flags",
]

#: (verb, resource, subresource) the runtime needs in its namespace.
RUNTIME_RIGHTS: Final = (
    ("get", "peerrecoveries", ""),
    ("list", "peerrecoveries", ""),
    ("watch", "peerrecoveries", ""),
    ("create", "peerrecoveries", ""),
    ("patch", "peerrecoveries", "status"),
)
#: The container runtime's own /dev/shm when no emptyDir is mounted there.
DEFAULT_SHM_BYTES: Final = 64 * 1024**2
_BACKEND: Final = "peer-recovery"


@dataclass(frozen=True)
class Check:
    name: str
    #: True passed, False failed, None skipped.
    ok: bool | None
    detail: str
    fix: str = ""


@dataclass(frozen=True)
class Shm:
    """What backs /dev/shm: ``memory`` (True for a memory emptyDir / tmpfs), its size."""

    mounted: bool
    memory: bool = False
    size_bytes: int | None = None
    source: str = ""


@dataclass(frozen=True)
class PodFacts:
    """Everything the checks look at, for one pod (or one replica template)."""

    where: str
    #: env var -> its value, or ``fieldRef:<path>`` when it comes from the downward API.
    env: Mapping[str, str]
    shm: Shm
    #: Whether a ServiceAccount token is (or will be) mounted, and which account.
    token: bool
    service_account: str
    #: The container's command line (command + args); None when not known.
    argv: Sequence[str] | None
    #: The job's annotations, when checking a PyTorchJob.
    job_annotations: Mapping[str, str] | None = None
    #: (verb, resource, subresource) -> allowed, from SelfSubjectAccessReviews (in a pod).
    rights: Mapping[tuple[str, str, str], bool] | None = None
    #: Why the rights could not be asked for (in a pod), if they could not.
    rights_error: str = ""
    #: For a Pod of a PyTorchJob: whether the webhook completed it; None when not known.
    mutated: bool | None = None


# --- quantities -----------------------------------------------------------------------------


def parse_quantity(text: str | int) -> int:
    """A Kubernetes quantity ("8Gi", "500M", "1e9", 1024) in bytes, read by the Kubernetes
    client's own parser so the doctor agrees with the API server; a fraction of a byte is
    rounded up. ValueError names the value."""
    # Imported here: the runtime imports no Kubernetes client at module level.
    from kubernetes.utils.quantity import parse_quantity as kube_quantity

    if isinstance(text, bool):
        raise ValueError(f"{text!r} is not a quantity (e.g. 512Mi, 8Gi, 2G, 1000000)")
    try:
        value = kube_quantity(text)
    except (ValueError, TypeError, ArithmeticError):
        raise ValueError(f"{text!r} is not a quantity (e.g. 512Mi, 8Gi, 2G, 1000000)") from None
    if value < 0:
        raise ValueError(f"{text!r} is negative; a size is a quantity >= 0")
    return math.ceil(value)


# --- the checks -----------------------------------------------------------------------------


def check_identity(facts: PodFacts) -> Check:
    missing, literal = [], []
    for name, path in IDENTITY_ENV.items():
        value = facts.env.get(name)
        if not value:
            missing.append(name)
        elif value.startswith("fieldRef:") and value != f"fieldRef:{path}":
            literal.append(f"{name} comes from {value[9:]}, not {path}")
    if missing or literal:
        fix = "add to the container's env: " + ", ".join(
            f"{{name: {n}, valueFrom: {{fieldRef: {{fieldPath: {IDENTITY_ENV[n]}}}}}}}"
            for n in IDENTITY_ENV
            if n in missing or any(x.startswith(n) for x in literal)
        )
        what = "; ".join(([f"missing {', '.join(missing)}"] if missing else []) + literal)
        return Check("pod identity (downward API)", False, what, fix)
    shown = ", ".join(f"{n}={facts.env[n]}" for n in IDENTITY_ENV)
    return Check("pod identity (downward API)", True, shown)


def check_shm(facts: PodFacts, state_bytes: int | None) -> Check:
    name = "/dev/shm for snapshots"
    shm = facts.shm
    need = None if state_bytes is None else 2 * state_bytes
    fix_size = format_bytes(need) if need else "twice the state size"
    fix = (
        "mount an emptyDir with medium: Memory and sizeLimit >= "
        f"{fix_size} at /dev/shm (two snapshot slots; pass --state-bytes to size it)"
    )
    if not shm.mounted or not shm.memory:
        seen = "nothing is mounted at /dev/shm" if not shm.mounted else f"/dev/shm is {shm.source}"
        return Check(name, False, f"{seen}: snapshots would not survive a worker restart "
                     "in memory", fix)  # fmt: skip
    if shm.size_bytes is None:
        return Check(name, False, f"{shm.source} has no sizeLimit: its size is unknown and "
                     "the container runtime's 64 MiB default may apply", fix)  # fmt: skip
    size = format_bytes(shm.size_bytes)
    if need is not None and shm.size_bytes < need:
        return Check(name, False, f"{shm.source} holds {size}; two snapshots of "
                     f"{format_bytes(state_bytes or 0)} need {format_bytes(need)}", fix)  # fmt: skip
    if need is None and shm.size_bytes <= DEFAULT_SHM_BYTES:
        return Check(name, False, f"{shm.source} holds only {size}", fix)
    enough = f", enough for two snapshots of {format_bytes(state_bytes or 0)}" if need else ""
    return Check(name, True, f"{shm.source}, {size}{enough}")


def check_token(facts: PodFacts) -> Check:
    name = "ServiceAccount token"
    fix = ("run the pod as the ServiceAccount the chart's runtime Role is bound to "
           "(serviceAccountName: <runtime.serviceAccountName>) with its token mounted")  # fmt: skip
    if not facts.token:
        return Check(name, False, "no ServiceAccount token is mounted "
                     "(automountServiceAccountToken: false)", fix)  # fmt: skip
    if facts.service_account in ("", "default"):
        return Check(name, False, "the pod runs as the namespace's 'default' ServiceAccount, "
                     "which the runtime Role is not bound to", fix)  # fmt: skip
    return Check(name, True, f"token of ServiceAccount {facts.service_account!r}")


def check_permissions(facts: PodFacts) -> Check:
    name = "ServiceAccount permissions"
    if facts.rights_error:
        return Check(name, False, f"could not ask the API server: {facts.rights_error}",
                     "check the token and that the API server is reachable from the pod")  # fmt: skip
    if facts.rights is None:
        return Check(name, None, "not checked against a manifest; run `peer-recovery doctor` "
                     "inside the pod to ask the API server (SelfSubjectAccessReview)")  # fmt: skip
    denied = [f"{v} {r}{'/' + s if s else ''}" for (v, r, s) in RUNTIME_RIGHTS
              if not facts.rights.get((v, r, s))]  # fmt: skip
    if denied:
        return Check(name, False, f"denied: {', '.join(denied)}",
                     "install the chart's runtime Role for this namespace "
                     "(runtime.serviceAccountName, runtime.namespaces)")  # fmt: skip
    return Check(name, True, "get/list/watch/create peerrecoveries, patch peerrecoveries/status")


def _torchrun_args(argv: Sequence[str]) -> list[str] | None:
    """The arguments after ``torchrun`` / ``-m torch.distributed.run``, or None."""
    tokens = list(argv)
    for i, token in enumerate(tokens):  # a shell line: split it and look inside
        if (" " in token) and ("torchrun" in token or "torch.distributed.run" in token):
            return _torchrun_args(tokens[:i] + shlex.split(token) + tokens[i + 1 :])
    for i, token in enumerate(tokens):
        if token.rsplit("/", 1)[-1] == "torchrun":
            return tokens[i + 1 :]
        if token == "torch.distributed.run" and i > 0 and tokens[i - 1] == "-m":
            return tokens[i + 1 :]
    return None


#: The torchrun flags the check reads, by their argparse destination.
_FLAGS: Final = {"rdzv-backend": "rdzv_backend", "rdzv-id": "rdzv_id", "nnodes": "nnodes",
                 "max-restarts": "max_restarts"}  # fmt: skip
#: torchrun's flags that take no value, for the fallback parser (every other takes one).
_BOOLEAN_FLAGS: Final = frozenset(
    {"--standalone", "-m", "--module", "--no-python", "--no_python", "--run-path", "--run_path"}
)


def _by_torchrun(args: Sequence[str]) -> dict[str, str | None] | None:
    """The flags as torchrun itself reads them (its own parser: every spelling, abbreviation
    and value-taking flag it knows), None given on the command line; None where torch is not
    installed (the torch-free ``peer-recovery[cli]``) or torchrun would refuse the line."""
    try:
        from torch.distributed.run import get_args_parser
    except ImportError:
        return None
    parser = get_args_parser()
    # Its defaults come from this process's PET_* variables; the pod's are applied later.
    parser.set_defaults(**dict.fromkeys(_FLAGS.values()))

    def refuse(message: str) -> NoReturn:
        raise ValueError(message)

    parser.error = refuse  # type: ignore[method-assign]
    try:
        parsed, _ = parser.parse_known_args(list(args))
    except (ValueError, SystemExit):
        return None
    return {
        name: None if getattr(parsed, dest, None) is None else str(getattr(parsed, dest))
        for name, dest in _FLAGS.items()
    }


def _by_hand(args: Sequence[str]) -> dict[str, str | None]:
    """The flags read without torch: either spelling, ``--f=v`` or ``--f v``, up to the
    training script (whose own flags are not torchrun's)."""
    i = 0
    while i < len(args) and args[i].startswith("-"):
        i += 1 if ("=" in args[i] or args[i] in _BOOLEAN_FLAGS) else 2
    own = list(args[: min(i, len(args))])
    found: dict[str, str | None] = dict.fromkeys(_FLAGS)
    for name, dest in _FLAGS.items():
        spellings = {f"--{name}", f"--{dest}"}
        for j, token in enumerate(own):
            key, eq, value = token.partition("=")
            if key in spellings:
                found[name] = value if eq else (own[j + 1] if j + 1 < len(own) else "")
    return found


def torchrun_flags(args: Sequence[str], env: Mapping[str, str]) -> dict[str, str | None]:
    """The values of the flags in ``_FLAGS``: from the command line (torchrun's parser where
    torch is installed, else :func:`_by_hand`), else the pod's ``PET_<FLAG>`` variable (what
    torchrun reads when a flag is absent), else None."""
    flags = _by_torchrun(args) or _by_hand(args)
    for name, dest in _FLAGS.items():
        if flags[name] is None:
            pet = env.get("PET_" + dest.upper())
            flags[name] = None if pet is None or pet.startswith("fieldRef:") else pet
    return flags


def check_torchrun(facts: PodFacts) -> Check:
    name = "torchrun flags"
    if facts.argv is None:
        return Check(name, None, "no command line known; pass --command '<the pod's command>'")
    args = _torchrun_args(facts.argv)
    if args is None:
        return Check(name, False, f"the command does not run torchrun: {' '.join(facts.argv)[:200]}",
                     "run the script with torchrun --rdzv-backend=peer-recovery ...")  # fmt: skip
    problems: list[str] = []
    flags = torchrun_flags(args, facts.env)
    backend = flags["rdzv-backend"]
    if backend != _BACKEND:
        problems.append(
            f"--rdzv-backend is {backend or 'unset (static)'}; use --rdzv-backend={_BACKEND}"
        )
    raw_restarts = flags["max-restarts"]
    try:
        restarts = int(raw_restarts) if raw_restarts is not None else 0
    except ValueError:
        restarts = 0
        problems.append(f"--max-restarts={raw_restarts!r} is not a number")
    nnodes = flags["nnodes"] or "1"
    low, _, high = nnodes.partition(":")
    try:
        min_nodes, max_nodes = int(low), int(high or low)
    except ValueError:
        min_nodes, max_nodes = 0, -1
        problems.append(f"--nnodes={nnodes!r} is not N or N:N")
    run_id = flags["rdzv-id"] or "none"
    problems += launch_problems(run_id=run_id, min_nodes=min_nodes, max_nodes=max_nodes,
                                max_restarts=restarts)  # fmt: skip
    if problems:
        return Check(name, False, "; ".join(problems),
                     f"torchrun --rdzv-backend={_BACKEND} --rdzv-id=<job name> "
                     "--nnodes=<N> --max-restarts=3 ...")  # fmt: skip
    return Check(name, True, f"--rdzv-backend={backend} --rdzv-id={run_id} --nnodes={nnodes} "
                 f"--max-restarts={restarts}")  # fmt: skip


def check_job_annotation(annotations: Mapping[str, str]) -> Check:
    name = "job opted in"
    try:
        settings = parse_job_annotations(annotations)
    except AnnotationError as error:
        return Check(name, False, str(error), 'annotate the job: peer-recovery: "enabled"')
    if not settings.enabled:
        return Check(name, False, "the PyTorchJob lacks the annotation peer-recovery: enabled",
                     'annotate the job: peer-recovery: "enabled"')  # fmt: skip
    return Check(name, True, f"peer-recovery: enabled, pods per replica {settings.replication}")


def run_checks(facts: PodFacts, *, state_bytes: int | None = None) -> list[Check]:
    checks = []
    if facts.job_annotations is not None:
        checks.append(check_job_annotation(facts.job_annotations))
    checks += [
        check_identity(facts),
        check_shm(facts, state_bytes),
        check_token(facts),
        check_permissions(facts),
        check_torchrun(facts),
    ]
    if facts.mutated is not None:
        checks.append(check_webhook(facts))
    return checks


def check_webhook(facts: PodFacts) -> Check:
    name = "webhook"
    if facts.mutated:
        return Check(name, True, "the pod was completed by the peer-recovery webhook")
    return Check(
        name, False,
        "the pod lacks the annotation peerrecovery.io/mutated: it was created while the "
        "webhook was down or before it was installed (the operator posts PodNotMutated on the "
        "job), so what the webhook adds is checked above as the pod has it",
        "once the webhook is up, delete the pod: its controller recreates it, completed",
    )  # fmt: skip


# --- facts from a manifest ------------------------------------------------------------------


def facts_from_manifest(doc: Mapping[str, Any], *, webhook: bool = True) -> list[PodFacts]:
    """One :class:`PodFacts` per pod template: a Pod, or each replica of a PyTorchJob (with
    ``webhook``, an opted-in job's templates as the webhook completes them). ValueError
    names what the manifest lacks."""
    kind = doc.get("kind")
    if kind == "Pod":
        meta = doc.get("metadata") or {}
        facts = _pod_facts(f"Pod {meta.get('name', '?')}", doc.get("spec") or {}, None)
        if names.LABEL_JOB_NAME not in (meta.get("labels") or {}):
            return [facts]
        mutated = names.ANNOTATION_MUTATED in (meta.get("annotations") or {})
        return [replace(facts, mutated=mutated)]
    if kind == "PyTorchJob":
        meta = doc.get("metadata") or {}
        specs = (doc.get("spec") or {}).get("pytorchReplicaSpecs") or {}
        if not specs:
            raise ValueError("the PyTorchJob has no spec.pytorchReplicaSpecs")
        annotations = meta.get("annotations") or {}
        completed = webhook and is_enabled(annotations)
        return [
            _pod_facts(
                f"PyTorchJob {meta.get('name', '?')} {rtype}",
                ((replica or {}).get("template") or {}).get("spec") or {},
                annotations,
                webhook=completed,
            )
            for rtype, replica in sorted(specs.items())
        ]
    raise ValueError(f"expected a Pod or a PyTorchJob, got kind {kind!r}")


def webhook_shm_bytes(annotations: Mapping[str, str], memory_limit: int | None) -> int | None:
    """The /dev/shm sizeLimit the webhook sets (its rule, docs/webhook.md): the job's
    ``peerrecovery.io/shm-size``, else twice ``peerrecovery.io/snapshot-size``, else half
    the container's memory limit, else none. A malformed annotation counts as absent."""

    def quantity(key: str) -> int | None:
        try:
            value = parse_quantity(annotations[key]) if key in annotations else None
        except ValueError:
            return None
        return value if value else None

    explicit, snapshot = (
        quantity(names.ANNOTATION_SHM_SIZE),
        quantity(names.ANNOTATION_SNAPSHOT_SIZE),
    )
    if explicit is not None:
        return explicit
    if snapshot is not None:
        return 2 * snapshot
    return None if memory_limit is None else memory_limit // 2


def _pod_facts(
    where: str, spec: Mapping[str, Any], annotations: Any, *, webhook: bool = False
) -> PodFacts:
    containers = spec.get("containers") or []
    if not containers:
        raise ValueError(f"{where}: the pod template has no containers")
    container = next((c for c in containers if c.get("name") == "pytorch"), containers[0])
    env: dict[str, str] = {}
    for item in container.get("env") or ():
        ref = ((item.get("valueFrom") or {}).get("fieldRef") or {}).get("fieldPath")
        env[item.get("name", "")] = f"fieldRef:{ref}" if ref else str(item.get("value", ""))
    volumes = {v.get("name"): v for v in spec.get("volumes") or ()}
    mount = next((m for m in container.get("volumeMounts") or () if m.get("mountPath") in
                  ("/dev/shm", "/dev/shm/")), None)  # fmt: skip
    if mount is None:
        shm = Shm(mounted=False)
    else:
        volume = volumes.get(mount.get("name")) or {}
        empty = volume.get("emptyDir")
        if empty is None:
            shm = Shm(True, False, None, f"volume {mount.get('name')!r}, not an emptyDir")
        elif (empty or {}).get("medium") != "Memory":
            shm = Shm(
                True, False, None, f"emptyDir {mount.get('name')!r} on disk (no medium: Memory)"
            )
        else:
            limit = (empty or {}).get("sizeLimit")
            shm = Shm(True, True, None if limit is None else parse_quantity(limit),
                      f"memory emptyDir {mount.get('name')!r}")  # fmt: skip
    argv = [*(container.get("command") or ()), *(container.get("args") or ())] or None
    account = str(spec.get("serviceAccountName") or "")
    if webhook:  # as the operator's webhook completes the pod (peer_recovery_operator.mutation)
        for env_name, path in IDENTITY_ENV.items():
            env.setdefault(env_name, f"fieldRef:{path}")
        if not shm.mounted:
            size = webhook_shm_bytes(annotations or {}, _memory_limit(container))
            shm = Shm(True, True, size, "memory emptyDir added by the webhook")
        if account in ("", "default"):
            account = "peer-recovery-runtime, set by the webhook"
    return PodFacts(
        where=where,
        env=env,
        shm=shm,
        token=spec.get("automountServiceAccountToken", True) is not False,
        service_account=account,
        argv=argv,
        job_annotations=annotations,
    )


def _memory_limit(container: Mapping[str, Any]) -> int | None:
    raw = ((container.get("resources") or {}).get("limits") or {}).get("memory")
    try:
        return None if raw is None else parse_quantity(raw)
    except ValueError:
        return None
