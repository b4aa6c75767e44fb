"""Operator benchmark: reaction latency, sweep time and memory, on the real test control plane.

1. Reaction latency, with 1,024 live pods in one job and 10,000 finished PeerRecoveries of
   that job in the namespace: replace pods one at a time (delete, then create under the same
   name, as the training-operator does) and time from the replacement's create call
   returning to a watch seeing its PeerRecovery created (and, printed too, ``Planned``).
   Anchor: creating and status-patching one PeerRecovery directly (the two writes the
   operator must make anyway), measured in the same run; latency is printed as a ratio.
2. Sweep time: the operator's own ``peer_recovery_sweep_seconds`` histogram over the
   sweeps made while those 10,000 finished records were present (mean and the bucket that
   holds the slowest). Retention is set high (``--keep-finished``) so the records stay.
3. Peak RSS: the operator process's VmHWM with 5,000 watched pods of realistic size (full
   spec, ~200 env vars, annotations, status; 10-30 KB each as stored) in five opted-in
   PyTorchJobs, besides the above; plus 1,000 pods of no PyTorchJob, which the pod watch's
   label selector keeps away. Anchor: its RSS before any pod.

Run: ``.venv/bin/python benchmarks/operator_latency.py [--quick]`` (needs ``make tools``).
Targets (docs/operator.md): p99 < 100 ms, sweep < 50 ms, RSS < 150 MB. The last line is
``RESULT p99_ms=<f> sweep_ms=<f> rss_mb=<f>``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from peer_recovery.contract import names  # noqa: E402
from testbed.controlplane import pytorchjob as pj  # noqa: E402
from testbed.controlplane.cluster import ControlPlane  # noqa: E402
from testbed.operator_process import CRD, OperatorProcess, wait_for  # noqa: E402

NAMESPACE = "bench"
JOB = "job1024"
ENABLED = {names.ANNOTATION_ENABLED: names.ANNOTATION_ENABLED_VALUE}


class RecoveryWatch:
    """Records when each target UID's PeerRecovery is first seen at all, and first seen
    Planned (or FellBack)."""

    def __init__(self, client: Any) -> None:
        from kubernetes import watch
        from kubernetes.client import CustomObjectsApi

        self.created: dict[str, float] = {}
        self.planned: dict[str, float] = {}
        self._cond = threading.Condition()
        self._watch = watch.Watch()
        self._custom = CustomObjectsApi(client)
        self._stopped = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopped:
            try:
                self._stream()
            except Exception:  # the server ends watches now and then: watch again
                time.sleep(0.05)

    def _stream(self) -> None:
        stream = self._watch.stream(
            self._custom.list_namespaced_custom_object,
            names.GROUP,
            names.VERSION,
            NAMESPACE,
            names.PLURAL,
            label_selector=f"{names.LABEL_RECOVERY_JOB}={JOB}",
            timeout_seconds=300,
        )
        for event in stream:
            seen = time.monotonic()
            obj = event["object"]
            uid = obj["spec"]["target"]["podUID"]
            phase = (obj.get("status") or {}).get("phase")
            with self._cond:
                self.created.setdefault(uid, seen)
                if phase in ("Planned", "FellBack"):
                    self.planned.setdefault(uid, seen)
                self._cond.notify_all()

    def wait(self, uid: str, timeout: float = 60.0) -> tuple[float, float]:
        """When ``uid``'s PeerRecovery was first seen, and first seen planned."""
        with self._cond:
            if not self._cond.wait_for(lambda: uid in self.planned, timeout=timeout):
                raise TimeoutError(f"no Planned PeerRecovery for {uid} after {timeout}s")
            return self.created[uid], self.planned[uid]

    def stop(self) -> None:
        self._stopped = True
        self._watch.stop()


def patiently(call: Any, *args: Any, tries: int = 5) -> Any:
    """``call(*args)``, again after a 5xx or a timeout (a loaded test API server sheds load);
    None when a retried create finds that the first try did land (409)."""
    from kubernetes.client.exceptions import ApiException

    for attempt in range(tries):
        try:
            return call(*args)
        except ApiException as error:
            if attempt and error.status == 409:
                return None
            if error.status is None or error.status < 500 or attempt == tries - 1:
                raise
            time.sleep(1.0 + attempt)
    raise AssertionError("unreachable")


def realistic_pod(name: str, node: str, labels: dict[str, str]) -> dict[str, Any]:
    env = [{"name": f"SETTING_{i:03d}", "value": f"value-{i:03d}-" + "x" * 40} for i in range(200)]
    return {
        "metadata": {
            "name": name,
            "labels": {**labels, "app": "bench", "team": "ml-platform"},
            "annotations": {f"bench.example/note-{i}": "y" * 200 for i in range(15)},
        },
        "spec": {
            "nodeName": node,
            "containers": [
                {
                    "name": "pytorch",
                    "image": pj.DEFAULT_IMAGE,
                    "command": ["torchrun", "--nnodes=8", "--nproc-per-node=8", "train.py"],
                    "env": env,
                    "resources": {"limits": {"cpu": "8", "memory": "64Gi"}},
                    "volumeMounts": [{"name": "shm", "mountPath": "/dev/shm"}],
                }
            ],
            "volumes": [{"name": "shm", "emptyDir": {"medium": "Memory"}}],
        },
    }


def rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise LookupError(field)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def anchor_write_seconds(client: Any, job: dict[str, Any], samples: int = 10) -> float:
    """Median of create + status patch of one PeerRecovery, made directly."""
    from kubernetes.client import CustomObjectsApi

    from peer_recovery.contract.bodies import PodRef, build_peer_recovery, build_status

    custom = CustomObjectsApi(client)
    times = []
    for i in range(samples):
        body = build_peer_recovery(
            namespace=NAMESPACE,
            job_name="anchor",
            job_uid=job["metadata"]["uid"],
            target=PodRef(f"anchor-worker-{i}", f"uid-{i}", "worker", i, i + 1),
            mode="Local",
            reason="ContainerRestarted",
            attempt=1,
            planned_by="runtime",
        )
        began = time.monotonic()
        made = custom.create_namespaced_custom_object(
            names.GROUP, names.VERSION, NAMESPACE, names.PLURAL, body
        )
        patch = {
            "metadata": {"resourceVersion": made["metadata"]["resourceVersion"]},
            "status": build_status("Planned", attempt=1),
        }
        custom.patch_namespaced_custom_object_status(
            names.GROUP, names.VERSION, NAMESPACE, names.PLURAL, body["metadata"]["name"], patch
        )
        times.append(time.monotonic() - began)
    return statistics.median(times)


def create_pods_fast(client: Any, job: dict[str, Any], nodes: list[str]) -> None:
    from kubernetes.client import CoreV1Api

    core = CoreV1Api(client)
    replicas = pj._replicas(job)

    def one(item: tuple[int, tuple[str, int]]) -> None:
        rank, (rtype, index) = item
        manifest = pj._pod_manifest(
            job, rtype, index, rank, len(replicas), nodes[rank % len(nodes)]
        )
        core.create_namespaced_pod(NAMESPACE, manifest)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, enumerate(replicas)))


def wait_all_ready(client: Any, job: str, count: int, timeout: float = 300) -> None:
    def ready() -> bool:
        pods = pj.job_pods(client, NAMESPACE, job)
        return len(pods) == count and all(pj._is_ready(p) for p in pods)

    wait_for(f"{count} pods of {job} Ready", ready, timeout=timeout)


def metric(operator: OperatorProcess, prefix: str) -> float:
    """The sum of the operator's samples whose line starts with ``prefix``."""
    return sum(
        float(line.split()[-1])
        for line in operator.metrics_text().splitlines()
        if line.startswith(prefix)
    )


def wait_quiet(operator: OperatorProcess, timeout: float = 600) -> float:
    """Wait until the operator has handled every watch event so far; return how long it took."""
    began, last, still = time.monotonic(), -1.0, 0
    while time.monotonic() - began < timeout:
        try:
            count = metric(operator, "peer_recovery_watch_events_total")
        except OSError:  # busy (a fresh operator parsing its initial listing): not quiet yet
            count = -1.0
        still = still + 1 if count == last else 0
        if still >= 5:
            return time.monotonic() - began
        last = count
        time.sleep(0.2)
    raise TimeoutError("the operator kept receiving watch events")


def load_finished_records(client: Any, job: dict[str, Any], total: int) -> float:
    """``total`` finished (Succeeded) PeerRecoveries of ``job``, spread over its slots, as a
    long-running job accumulates them; returns how long writing them took."""
    from kubernetes.client import CustomObjectsApi

    from peer_recovery.contract.bodies import PodRef, build_peer_recovery, build_status

    custom = CustomObjectsApi(client)
    slots = pj._replicas(job)
    name = job["metadata"]["name"]

    def one(i: int) -> None:
        rank = i % len(slots)
        rtype, index = slots[rank]
        pod = pj.pod_name(name, rtype, index)
        body = build_peer_recovery(
            namespace=NAMESPACE,
            job_name=name,
            job_uid=job["metadata"]["uid"],
            target=PodRef(pod, f"gone-{i}", rtype.lower(), index, rank),
            mode="Local",
            reason="ContainerRestarted",
            attempt=1,
            planned_by="runtime",
        )
        made = patiently(
            custom.create_namespaced_custom_object,
            names.GROUP, names.VERSION, NAMESPACE, names.PLURAL, body,
        )  # fmt: skip
        if made is None:
            made = custom.get_namespaced_custom_object(
                names.GROUP, names.VERSION, NAMESPACE, names.PLURAL, body["metadata"]["name"]
            )
        patch = {
            "metadata": {"resourceVersion": made["metadata"]["resourceVersion"]},
            "status": build_status("Succeeded", attempt=1, message="benchmark history"),
        }
        patiently(
            custom.patch_namespaced_custom_object_status,
            names.GROUP, names.VERSION, NAMESPACE, names.PLURAL, body["metadata"]["name"], patch,
        )  # fmt: skip

    began = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(total)))
    return time.monotonic() - began


def sweep_seconds(operator: OperatorProcess, window: float) -> tuple[float, float, int]:
    """(mean, upper bound of the slowest, count) of the sweeps made during ``window`` s,
    from the operator's ``peer_recovery_sweep_seconds`` histogram."""

    def buckets() -> dict[str, float]:
        found = {}
        for line in operator.metrics_text().splitlines():
            if line.startswith("peer_recovery_sweep_seconds_bucket"):
                bound = line.split('le="')[1].split('"')[0]
                found[bound] = float(line.split()[-1])
        return found

    sum0 = metric(operator, "peer_recovery_sweep_seconds_sum")
    count0 = metric(operator, "peer_recovery_sweep_seconds_count")
    before = buckets()
    time.sleep(window)
    count = metric(operator, "peer_recovery_sweep_seconds_count") - count0
    mean = (metric(operator, "peer_recovery_sweep_seconds_sum") - sum0) / max(count, 1)
    after = buckets()
    total = after["+Inf"] - before.get("+Inf", 0.0)
    slowest = next(
        float(bound)
        for bound in sorted(after, key=lambda b: float(b))
        if after[bound] - before.get(bound, 0.0) >= total
    )
    return mean, slowest, int(count)


def latency(
    client: Any, watch: RecoveryWatch, name: str, size: int, samples: int
) -> list[tuple[float, float]]:
    """(created, planned) seconds after each replacement's create call returned."""
    from kubernetes.client import CoreV1Api

    core = CoreV1Api(client)
    results = []
    for i in range(samples):
        pod = pj.pod_name(name, "worker", (i * 7) % (size - 1))
        template = pj._read_pod(client, NAMESPACE, pod)
        assert template is not None
        old_uid = template["metadata"]["uid"]
        core.delete_namespaced_pod(pod, NAMESPACE)
        for _ in range(3):
            pj.wait_pod_gone(client, NAMESPACE, pod, old_uid)
            created = core.create_namespaced_pod(NAMESPACE, pj._recreatable(template))
            began = time.monotonic()
            seen, planned = watch.wait(created.metadata.uid)
            results.append((seen - began, planned - began))
            try:
                pj.wait_pod_ready(client, NAMESPACE, pod, uid=created.metadata.uid, timeout=20)
                break
            except TimeoutError:
                # KWOK's delete stage for the old pod can land on the new one (same name);
                # the sample stands, and the slot is refilled before the next one.
                print(f"  note: {pod} vanished after its replacement; recreating", flush=True)
                old_uid = created.metadata.uid
    return results


def load_rss_pods(client: Any, nodes: list[str], in_jobs: int, others: int) -> None:
    """``in_jobs`` realistic pods in five opted-in PyTorchJobs, ``others`` in none."""
    from kubernetes.client import CoreV1Api

    core = CoreV1Api(client)
    jobs = 5
    per_job = in_jobs // jobs
    specs = []
    for j in range(jobs):
        job = pj.create_job(
            client, NAMESPACE, f"rss{j}", workers=per_job - 1, annotations=ENABLED, pods=False
        )
        for rank, (rtype, index) in enumerate(pj._replicas(job)):
            labels = pj._pod_manifest(job, rtype, index, rank, per_job, nodes[0])["metadata"][
                "labels"
            ]
            owner = {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "name": f"rss{j}", "uid": job["metadata"]["uid"], "controller": True}  # fmt: skip
            pod = realistic_pod(
                pj.pod_name(f"rss{j}", rtype, index), nodes[rank % len(nodes)], labels
            )
            pod["metadata"]["ownerReferences"] = [owner]
            specs.append(pod)
    for i in range(others):
        specs.append(realistic_pod(f"other-{i}", nodes[i % len(nodes)], {"app": "web"}))
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda body: patiently(core.create_namespaced_pod, NAMESPACE, body), specs))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="10 samples, 2,000 records, 1,000 RSS pods"
    )
    args = parser.parse_args(argv)
    size = 1024
    samples = 10 if args.quick else 30
    records = 2000 if args.quick else 10_000
    rss_pods = 1000 if args.quick else 5000
    work = Path(tempfile.mkdtemp(prefix="peer-recovery-bench-"))
    with ControlPlane(nodes=16, zones=4) as plane, plane.api_client() as client:
        plane.kubectl("apply", "-f", str(CRD))
        plane.kubectl("wait", "--for=condition=Established", "crd/peerrecoveries.peerrecovery.io")
        plane.kubectl("create", "namespace", NAMESPACE)
        nodes = pj.fake_node_names(client)
        keep = ("--keep-finished", str(records + 1))  # the records stay for the whole run
        operator = OperatorProcess(
            plane.kubeconfig, NAMESPACE, work / "operator.log", "--log-format", "json", *keep
        )
        operator.start()
        watch = RecoveryWatch(client)
        try:
            anchor_job = pj.create_job(client, NAMESPACE, "anchor", workers=1, pods=False)
            anchor = anchor_write_seconds(client, anchor_job)
            idle_rss = rss_kib(operator.proc.pid, "VmRSS")  # type: ignore[union-attr]
            job = pj.create_job(
                client, NAMESPACE, JOB, workers=size - 1, annotations=ENABLED, pods=False
            )
            create_pods_fast(client, job, nodes)
            wait_all_ready(client, JOB, size)
            absorbed = wait_quiet(operator)
            print(f"  {size} pods Ready; creation burst absorbed in {absorbed:.1f}s", flush=True)
            wrote = load_finished_records(client, job, records)
            absorbed = wait_quiet(operator)
            print(
                f"  {records} finished records written in {wrote:.1f}s, absorbed in "
                f"{absorbed:.1f}s",
                flush=True,
            )
            sweep_mean, sweep_slowest, sweeps = sweep_seconds(operator, 10.0)
            print(f"  sweep: mean {sweep_mean * 1e3:.1f} ms over {sweeps} sweeps", flush=True)
            values = latency(client, watch, JOB, size, samples)
            print("  created, ms:", " ".join(f"{c * 1e3:.0f}" for c, _ in values), flush=True)
            print("  planned, ms:", " ".join(f"{p * 1e3:.0f}" for _, p in values), flush=True)
            load_rss_pods(client, nodes, rss_pods, 1000)
            wait_quiet(operator)
            assert operator.healthy()
            peak = rss_kib(operator.proc.pid, "VmHWM")  # type: ignore[union-attr]
            watched = metric(operator, 'peer_recovery_watch_events_total{resource="pods"}')
            print(f"  peak RSS while the pods arrived: {peak / 1024:.0f} MB", flush=True)
            # A fresh process lists everything at once: the other peak (operator restarts)
            operator.stop()
            operator.start()
            wait_quiet(operator)
            assert operator.healthy()
            relisted = rss_kib(operator.proc.pid, "VmHWM")  # type: ignore[union-attr]
            print(f"  peak RSS of a restarted operator: {relisted / 1024:.0f} MB", flush=True)
        finally:
            watch.stop()
            operator.stop()
    created = [c for c, _ in values]
    planned = [p for _, p in values]
    p99 = percentile(created, 0.99)
    print()
    print(f"anchor: create + status patch of one PeerRecovery = {anchor * 1e3:.1f} ms (median)")
    print(f"| {size} pods, {records} finished records | p50 | p99 | p99 / anchor |")
    print("| --- | ---: | ---: | ---: |")
    for what, vals in (("replaced -> created", created), ("replaced -> Planned", planned)):
        q99 = percentile(vals, 0.99)
        print(
            f"| {what} | {statistics.median(vals) * 1e3:.0f} ms | {q99 * 1e3:.0f} ms "
            f"| {q99 / anchor:.1f}x |"
        )
    print()
    print(f"sweep with {records} finished records: mean {sweep_mean * 1e3:.1f} ms over {sweeps} sweeps, slowest <= {sweep_slowest * 1e3:.1f} ms")  # fmt: skip
    print()
    print("| operator RSS | value | / idle |")
    print("| --- | ---: | ---: |")
    print(f"| idle (no pods) | {idle_rss / 1024:.0f} MB | 1.0x |")
    print(
        f"| peak, {size + rss_pods} watched pods, {records} records "
        f"| {peak / 1024:.0f} MB | {peak / idle_rss:.1f}x |"
    )
    print(
        f"| peak of a restarted operator listing all of them "
        f"| {relisted / 1024:.0f} MB | {relisted / idle_rss:.1f}x |"
    )
    print(f"(pod watch events handled: {watched:.0f}; the 1,000 pods of no job never arrive)")
    rss_mb = max(peak, relisted) / 1024
    print(f"RESULT p99_ms={p99 * 1e3:.1f} sweep_ms={sweep_mean * 1e3:.1f} rss_mb={rss_mb:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
