"""Prometheus metrics of the operator, in a registry of its own (no global state).

- ``peer_recovery_recoveries{phase,mode,reason}``: PeerRecoveries in the watched
  namespaces now, by phase (a gauge kept from the watch, so it is right after a restart);
- ``peer_recovery_active_recoveries``: those not yet in a terminal phase;
- ``peer_recovery_plans_total{phase,mode,reason}``: plans this process wrote;
- ``peer_recovery_lifecycle_actions_total{action}``: re-plans, supersessions, give-ups;
- ``peer_recovery_planning_seconds``: from seeing the pod change to the recovery's status
  being written (the operator's share of the reaction latency);
- ``peer_recovery_input_warnings_total{kind}``: malformed objects reported;
- ``peer_recovery_watch_events_total{resource}``: watch events handled;
- ``peer_recovery_api_errors_total{verb,kind,code}``: API calls that did not succeed, by
  HTTP status (``connection`` when no response came; 404 and 409 included, as the API
  server's own client metrics count them);
- ``peer_recovery_rounds_total{outcome}`` and ``peer_recovery_round_seconds``: rounds of
  API work on one job (``ok`` or ``failed``) and how long each took;
- ``peer_recovery_sweep_seconds``: how long each lifecycle sweep took;
- ``peer_recovery_job_changes_total{reason}``: suspends, resumes and scalings recognised.
- ``peer_recovery_leader``: 1 while this replica holds the leader-election Lease;
- ``peer_recovery_resync_drift_total``: objects a periodic relist showed the watches missed;
- ``peer_recovery_gc_frozen_objects``: objects moved out of the garbage collector's full
  passes (:mod:`peer_recovery_operator.heap`); it should follow the state's size.
"""

from __future__ import annotations

import gc
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from peer_recovery.contract.records import RecoveryRecord

__all__ = ["Metrics"]

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_FAST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.recoveries = Gauge(
            "peer_recovery_recoveries",
            "PeerRecoveries in the watched namespaces, by phase, mode and reason.",
            ["phase", "mode", "reason"],
            registry=r,
        )
        self.active = Gauge(
            "peer_recovery_active_recoveries",
            "PeerRecoveries not yet in a terminal phase.",
            registry=r,
        )
        self.leader = Gauge(
            "peer_recovery_leader",
            "1 while this replica holds the leader-election Lease (always 1 without one).",
            registry=r,
        )
        self.resync_drift = Counter(
            "peer_recovery_resync_drift",
            "Objects a periodic relist showed that the watches had not: vanished pods and "
            "PeerRecoveries, pods never delivered.",
            registry=r,
        )
        self.plans = Counter(
            "peer_recovery_plans",
            "Plans written by this operator process, by resulting phase, mode and reason.",
            ["phase", "mode", "reason"],
            registry=r,
        )
        self.lifecycle = Counter(
            "peer_recovery_lifecycle_actions",
            "Lifecycle actions taken: replan, fail (superseded or exhausted), promote.",
            ["action"],
            registry=r,
        )
        self.planning_seconds = Histogram(
            "peer_recovery_planning_seconds",
            "Seconds from seeing a pod change to writing its PeerRecovery's status.",
            buckets=_BUCKETS,
            registry=r,
        )
        self.round_failures = Counter(
            "peer_recovery_round_failures",
            "Rounds of API work on a job that failed; their detections are queued again.",
            registry=r,
        )
        self.watch_events = Counter(
            "peer_recovery_watch_events",
            "Watch events handled, by resource (pods, pytorchjobs, nodes, peerrecoveries).",
            ["resource"],
            registry=r,
        )
        self.input_warnings = Counter(
            "peer_recovery_input_warnings",
            "Malformed objects reported (annotation, pod labels, job shape, missing job).",
            ["kind"],
            registry=r,
        )

        self.api_errors = Counter(
            "peer_recovery_api_errors",
            "API calls that did not succeed, by verb, resource and HTTP status (or connection).",
            ["verb", "kind", "code"],
            registry=r,
        )
        self.rounds = Counter(
            "peer_recovery_rounds",
            "Rounds of API work on one job, by outcome (ok, failed).",
            ["outcome"],
            registry=r,
        )
        self.round_seconds = Histogram(
            "peer_recovery_round_seconds",
            "Seconds one round of API work on one job took.",
            buckets=_BUCKETS,
            registry=r,
        )
        self.sweep_seconds = Histogram(
            "peer_recovery_sweep_seconds",
            "Seconds one lifecycle sweep took.",
            buckets=_FAST_BUCKETS,
            registry=r,
        )
        self.job_changes = Counter(
            "peer_recovery_job_changes",
            "Job changes after which pods come and go without replacement, by Event reason.",
            ["reason"],
            registry=r,
        )

        self.gc_frozen = Gauge(
            "peer_recovery_gc_frozen_objects",
            "Objects frozen out of the garbage collector's full passes.",
            registry=r,
        )
        self.gc_frozen.set_function(gc.get_freeze_count)

    def api_error(self, verb: str, kind: str, code: str) -> None:
        """Count one API call that failed (``KubernetesApi``'s ``on_error``)."""
        self.api_errors.labels(verb, kind, code).inc()

    def recovery_changed(self, old: RecoveryRecord | None, new: RecoveryRecord | None) -> None:
        """Move one object between the gauge's label sets as the watch reports it."""
        for view, delta in ((old, -1), (new, +1)):
            if view is None:
                continue
            self.recoveries.labels(view.phase.value, view.mode.value, view.reason.value).inc(delta)
            if not view.phase.terminal:
                self.active.inc(delta)

    def serve(self, host: str, port: int) -> Any:
        """Serve ``/metrics`` on a daemon thread; returns the server (``shutdown()`` stops it)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server
