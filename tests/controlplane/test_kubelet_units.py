"""The test kubelet's pure pieces: ``$(VAR)`` expansion, Service names to loopback, and
emptyDir mount paths to the pod's own directory."""

from __future__ import annotations

from pathlib import Path

from testbed.controlplane.kubelet import expand, rewrite_hosts, rewrite_mount


def test_expand_replaces_defined_names_and_keeps_the_rest() -> None:
    env = {"A": "1", "B": "two"}
    assert expand("$(A)-$(B)", env) == "1-two"
    assert expand("$(UNDEFINED)", env) == "$(UNDEFINED)"
    assert expand("$$(A)", env) == "$(A)"
    assert expand("no refs", env) == "no refs"


def test_rewrite_hosts_replaces_whole_service_names_only() -> None:
    services = ["job-master-0", "job-worker-0"]
    assert rewrite_hosts("job-master-0", services, "ns") == "127.0.0.1"
    assert rewrite_hosts("--rdzv-endpoint=job-master-0:29400", services, "ns") == (
        "--rdzv-endpoint=127.0.0.1:29400"
    )
    assert rewrite_hosts("job-master-0.ns.svc.cluster.local:1", services, "ns") == "127.0.0.1:1"
    assert rewrite_hosts("job-master-0.ns:1", services, "ns") == "127.0.0.1:1"
    # Not a Service of this namespace, or a longer name that merely contains one.
    assert rewrite_hosts("job-master-0.other", services, "ns") == "job-master-0.other"
    assert rewrite_hosts("xjob-master-0", services, "ns") == "xjob-master-0"
    assert rewrite_hosts("job-master-00", services, "ns") == "job-master-00"
    assert rewrite_hosts("tcp://job-master-0:1", services, "ns") == "tcp://127.0.0.1:1"
    # A path segment equal to a Service name is a path, not a host.
    assert rewrite_hosts("/pods/job-master-0/x", services, "ns") == "/pods/job-master-0/x"
    assert rewrite_hosts("/tmp/ns_job-master-0_uid", services, "ns") == "/tmp/ns_job-master-0_uid"


def test_rewrite_mount_moves_paths_under_the_mount_only() -> None:
    pod = Path("/work/pods/p/volumes/shm")
    assert rewrite_mount("/dev/shm", "/dev/shm", pod) == str(pod)
    assert rewrite_mount("/dev/shm/peer-recovery", "/dev/shm", pod) == f"{pod}/peer-recovery"
    assert rewrite_mount("--dir=/dev/shm/x", "/dev/shm/", pod) == f"--dir={pod}/x"
    assert rewrite_mount("/dev/shmem", "/dev/shm", pod) == "/dev/shmem"
    assert rewrite_mount("/tmp/dev/shm", "/dev/shm", pod) == "/tmp/dev/shm"
