"""Command line of ``peer-recovery-operator`` (also ``python -m peer_recovery_operator``).

Parses flags (precedence with environment variables and defaults lives in
:mod:`peer_recovery_operator.config`), sets up logging and the metrics endpoint, and runs
kopf with the handlers of :mod:`peer_recovery_operator.handlers`. The scope flags are
named as kopf's own CLI names them: ``--namespace/-n`` (repeatable) or
``--all-namespaces/-A``. Exit status: 0 after a clean stop, 2 for bad flags.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from collections.abc import Sequence

from peer_recovery_operator.config import (
    ConfigError,
    OperatorConfig,
    from_sources,
    metrics_host_port,
)

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peer-recovery-operator",
        description="Watch opted-in PyTorchJobs and plan peer recoveries of replaced pods.",
        epilog="Every flag may also be set as PEER_RECOVERY_<FLAG> (e.g. PEER_RECOVERY_MAX_ATTEMPTS).",
    )
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument(
        "-n",
        "--namespace",
        dest="namespaces",
        action="append",
        default=None,
        metavar="NS",
        help="watch this namespace (repeatable)",
    )
    scope.add_argument(
        "-A",
        "--all-namespaces",
        action="store_true",
        default=None,
        help="watch every namespace (needs the cluster-wide RBAC)",
    )
    add = parser.add_argument
    add(
        "--plan-deadline",
        type=float,
        metavar="S",
        help="re-plan a recovery Planned this long (120)",
    )
    add(
        "--stream-deadline",
        type=float,
        metavar="S",
        help="re-plan a recovery Streaming this long (600)",
    )
    add("--max-attempts", type=int, metavar="N", help="attempts per target before Failed (3)")
    add(
        "--catch-up-grace",
        type=float,
        metavar="S",
        help="catch-up rule's grace after a restart (60)",
    )
    add("--sweep-interval", type=float, metavar="S", help="how often deadlines are checked (2)")
    add(
        "--keep-finished",
        type=int,
        metavar="N",
        help="finished PeerRecoveries kept per pod, newest first (5)",
    )
    add(
        "--finished-ttl",
        type=float,
        metavar="S",
        help="delete finished PeerRecoveries older than this (604800: 7 days)",
    )
    add(
        "--liveness", metavar="URL", help="kopf liveness endpoint, e.g. http://0.0.0.0:8080/healthz"
    )
    add("--metrics-address", metavar="HOST:PORT", help="serve Prometheus /metrics here")
    add("--log-format", choices=("plain", "json"), help="log line format (plain)")
    add("--verbose", action="store_true", default=None, help="debug logging")
    add(
        "--lease-namespace",
        metavar="NS",
        help="elect a leader on a Lease in NS (HA: only the leader acts); default: no election",
    )
    add("--lease-name", metavar="NAME", help="the Lease's name (peer-recovery-operator)")
    add("--identity", metavar="ID", help="this replica's name in the Lease (<hostname>_<pid>)")
    add("--lease-duration", type=float, metavar="S", help="claim without renewal lasts (15)")
    add("--lease-renew-deadline", type=float, metavar="S", help="leader stops acting after (10)")
    add("--lease-retry-period", type=float, metavar="S", help="Lease read/renew period (2)")
    add(
        "--resync-interval",
        type=float,
        metavar="S",
        help="relist pods and PeerRecoveries this often (300)",
    )
    add("--kubeconfig", metavar="PATH", help="kubeconfig (default: $KUBECONFIG, then in-cluster)")
    _add_webhook_flags(parser)
    return parser


def _add_webhook_flags(parser: argparse.ArgumentParser) -> None:
    """The mutating webhook's flags (docs/webhook.md)."""
    group = parser.add_argument_group("mutating webhook")
    add = group.add_argument
    add("--webhook-address", metavar="HOST:PORT", help="serve the pod webhook (HTTPS) here")
    add("--webhook-cert-dir", metavar="DIR", help="tls.crt and tls.key (default: self-signed)")
    add("--webhook-config-name", metavar="NAME", help="MutatingWebhookConfiguration to patch")
    add("--webhook-hosts", metavar="H,H", help="DNS names / IPs of the self-signed certificate")
    add("--runtime-service-account", metavar="NAME", help="account set on default-account pods")
    add("--runtime-cluster-role", metavar="NAME", help="ClusterRole bound to it per namespace")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = from_sources(vars(args))
    except ConfigError as error:
        print(f"peer-recovery-operator: {error}", file=sys.stderr)
        return 2
    _configure_logging(config)
    if args.kubeconfig:
        os.environ["KUBECONFIG"] = args.kubeconfig  # kopf and our client both read it
    _run(config)
    return 0


def _configure_logging(config: OperatorConfig) -> None:
    import kopf

    log_format = kopf.LogFormat.JSON if config.log_format == "json" else kopf.LogFormat.FULL
    kopf.configure(verbose=config.verbose, log_format=log_format)
    if not config.verbose:  # kopf logs every handled event at INFO: thousands per minute
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
        logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("kubernetes").setLevel(logging.WARNING)
    logging.getLogger("urllib3").setLevel(logging.WARNING)


def _run(config: OperatorConfig) -> None:
    import kopf

    from peer_recovery_operator.engine import Engine
    from peer_recovery_operator.handlers import register
    from peer_recovery_operator.heap import freeze_after_full_passes
    from peer_recovery_operator.kube import KubernetesApi
    from peer_recovery_operator.metrics import Metrics

    metrics = Metrics()
    server = None
    if config.metrics_address:
        server = metrics.serve(*metrics_host_port(config.metrics_address))
    api = KubernetesApi(on_error=metrics.api_error)
    engine = Engine(api, config, metrics)
    elector = None
    if config.lease_namespace:
        from peer_recovery_operator.lease import LeaderElector, LeaseTiming

        timing = LeaseTiming(
            config.lease_duration, config.lease_renew_deadline, config.lease_retry_period
        )
        identity = config.identity or f"{socket.gethostname()}_{os.getpid()}"
        elector = LeaderElector(api, config.lease_namespace, config.lease_name, identity, timing)
    registry = kopf.OperatorRegistry()
    pod_listeners = []
    if config.webhook_address or config.runtime_service_account:
        from peer_recovery_operator.admission_handlers import register_admission

        audit = register_admission(registry, engine, config)
        if audit is not None:
            pod_listeners.append(audit)
    register(registry, engine, api, elector, pod_listeners)
    freeze_after_full_passes()
    try:
        kopf.run(
            registry=registry,
            clusterwide=config.all_namespaces,
            namespaces=list(config.namespaces),
            standalone=True,  # high availability is the Lease's (lease.py), not kopf peering's
            liveness_endpoint=config.liveness or None,
        )
    finally:
        if server is not None:
            server.shutdown()
