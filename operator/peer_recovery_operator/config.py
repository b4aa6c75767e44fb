"""The operator's settings, and the one place their precedence is written down.

Precedence, for every setting: the command-line flag, then the environment variable
``PEER_RECOVERY_<NAME>`` (``<NAME>`` is the flag without its dashes, upper-cased), then the
default below. The chart sets flags; the environment exists for quick experiments.
Invariant: an ``OperatorConfig`` is validated on construction, so a bad value is refused
with a message naming the setting before the operator starts watching anything.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

__all__ = ["ENV_PREFIX", "LOG_FORMATS", "ConfigError", "OperatorConfig", "from_sources"]

ENV_PREFIX = "PEER_RECOVERY_"
LOG_FORMATS = ("plain", "json")


class ConfigError(ValueError):
    """A setting has a value the operator cannot run with; the message names the setting."""


@dataclasses.dataclass(frozen=True)
class OperatorConfig:
    """Everything the operator's behaviour depends on besides the cluster itself."""

    namespaces: tuple[str, ...] = ()
    all_namespaces: bool = False
    #: A recovery in ``Planned`` longer than this is re-planned (the target never picked it up).
    plan_deadline: float = 120.0
    #: A recovery in ``Streaming`` longer than this is re-planned (the transfer stalled).
    stream_deadline: float = 600.0
    #: Attempts per target before the recovery is marked ``Failed`` (attempt 1 is the first).
    max_attempts: int = 3
    #: Catch-up rule after an operator restart: a pod first seen by this process is a
    #: replacement when it was created more than this after the oldest of its job's pods.
    catch_up_grace: float = 60.0
    #: How often deadlines and vanished sources are checked.
    sweep_interval: float = 2.0
    #: Finished PeerRecoveries kept per pod slot (the newest); older ones are deleted.
    keep_finished: int = 5
    #: Finished PeerRecoveries older than this (seconds) are deleted (default: 7 days).
    finished_ttl: float = 7 * 24 * 3600.0
    #: kopf's liveness endpoint, e.g. ``http://0.0.0.0:8080/healthz``; empty disables it.
    liveness: str = ""
    #: ``HOST:PORT`` of the Prometheus endpoint; empty disables it.
    metrics_address: str = ""
    log_format: str = "plain"
    verbose: bool = False
    #: Namespace of the leader-election Lease; empty runs without election (one replica).
    lease_namespace: str = ""
    #: Name of the Lease the replicas share.
    lease_name: str = "peer-recovery-operator"
    #: This replica's identity in the Lease; empty means ``<hostname>_<pid>``.
    identity: str = ""
    #: Seconds a leader's claim lasts without renewal before a standby takes over.
    lease_duration: float = 15.0
    #: A leader that could not renew for this long stops acting.
    lease_renew_deadline: float = 10.0
    #: How often every replica reads (the leader renews) the Lease.
    lease_retry_period: float = 2.0
    #: How often pods and PeerRecoveries are relisted to reconcile what a watch gap hid.
    resync_interval: float = 300.0
    #: ``HOST:PORT`` the mutating webhook listens on (HTTPS); empty serves no webhook.
    webhook_address: str = ""
    #: Directory holding ``tls.crt`` and ``tls.key`` (e.g. cert-manager's Secret, mounted);
    #: empty: the operator makes a self-signed pair and patches the caBundle itself.
    webhook_cert_dir: str = ""
    #: The MutatingWebhookConfiguration whose caBundle carries the self-signed CA.
    webhook_config_name: str = ""
    #: Comma-separated DNS names / IP addresses of the self-signed certificate.
    webhook_hosts: str = ""
    #: The ServiceAccount the webhook sets on pods running as ``default``, which the
    #: operator creates and binds in each namespace with an opted-in job; empty: neither.
    runtime_service_account: str = ""
    #: The ClusterRole that account is bound to (a RoleBinding per namespace).
    runtime_cluster_role: str = ""

    def __post_init__(self) -> None:
        if self.namespaces and self.all_namespaces:
            raise ConfigError("--namespace and --all-namespaces exclude each other")
        if not self.namespaces and not self.all_namespaces:
            raise ConfigError("give --namespace NS (repeatable) or --all-namespaces")
        for name in (
            "plan_deadline",
            "stream_deadline",
            "sweep_interval",
            "finished_ttl",
            "resync_interval",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{_flag(name)} must be > 0, got {getattr(self, name)!r}")
        if self.catch_up_grace < 0:
            raise ConfigError(f"--catch-up-grace must be >= 0, got {self.catch_up_grace!r}")
        if self.max_attempts < 1:
            raise ConfigError(f"--max-attempts must be >= 1, got {self.max_attempts!r}")
        if self.keep_finished < 1:
            raise ConfigError(f"--keep-finished must be >= 1, got {self.keep_finished!r}")
        if self.log_format not in LOG_FORMATS:
            raise ConfigError(f"--log-format must be one of {LOG_FORMATS}, got {self.log_format!r}")
        if self.metrics_address:
            metrics_host_port(self.metrics_address)
        if not 0 < self.lease_retry_period < self.lease_renew_deadline < self.lease_duration:
            raise ConfigError(
                "need 0 < --lease-retry-period < --lease-renew-deadline < --lease-duration, got "
                f"{self.lease_retry_period!r}, {self.lease_renew_deadline!r}, "
                f"{self.lease_duration!r}"
            )
        if self.webhook_address:
            metrics_host_port(self.webhook_address, "--webhook-address")
            if not self.webhook_cert_dir and not self.webhook_hosts:
                raise ConfigError(
                    "--webhook-address needs --webhook-cert-dir or --webhook-hosts "
                    "(the names of the self-signed certificate)"
                )
        if bool(self.runtime_service_account) != bool(self.runtime_cluster_role):
            raise ConfigError("--runtime-service-account and --runtime-cluster-role go together")

    def deadline_for(self, phase: str) -> float | None:
        """Seconds a recovery may stay in ``phase`` before the operator steps in."""
        return {"Planned": self.plan_deadline, "Streaming": self.stream_deadline}.get(phase)


def metrics_host_port(address: str, flag: str = "--metrics-address") -> tuple[str, int]:
    """Split ``HOST:PORT``; refuse anything else with a message naming the flag."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{flag} must be HOST:PORT, got {address!r}")
    return host, int(port)


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def from_sources(
    flags: Mapping[str, object], env: Mapping[str, str] | None = None
) -> OperatorConfig:
    """Build the config from parsed flags (``None`` = not given), the environment and defaults."""
    env = os.environ if env is None else env
    values: dict[str, object] = {}
    for field in dataclasses.fields(OperatorConfig):
        given = flags.get(field.name)
        if given is not None and given != () and given is not False:
            values[field.name] = tuple(given) if field.name == "namespaces" else given
            continue
        raw = env.get(ENV_PREFIX + field.name.upper())
        if raw is None or raw == "":
            continue
        values[field.name] = _convert(field.name, raw, field.default)
    return OperatorConfig(**values)  # type: ignore[arg-type]


def _convert(name: str, raw: str, default: object) -> object:
    env_name = ENV_PREFIX + name.upper()
    if name == "namespaces":
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    try:
        if isinstance(default, bool):
            if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("1", "true", "yes")
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
    except ValueError:
        raise ConfigError(f"{env_name}={raw!r} is not a valid {type(default).__name__}") from None
    return raw
