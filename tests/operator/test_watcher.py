"""The operator's own list-then-watch (``watcher``) and the slim bodies it hands over.

The protocol is driven through a scripted ``WatchApi`` (its 410s and failures cannot be
provoked at will on a real API server); the real one is exercised against the test
control plane in ``test_watcher_cluster.py``.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from typing import Any

from peer_recovery.contract import names
from peer_recovery_operator import views
from peer_recovery_operator.kube_watch import Gone, Page, WatchEvent
from peer_recovery_operator.watcher import Batch, LoopHandoff, Watcher
from tests.operator.bodies import pod_body


def big_pod(**kw: Any) -> dict[str, Any]:
    """A pod as the API server returns it: a large spec and metadata around what is read."""
    body = pod_body(shm_memory=True, restarts=2, **kw)
    body["metadata"]["ownerReferences"] = [
        {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "name": "train",
         "uid": "job-uid-train", "controller": True, "blockOwnerDeletion": True}
    ]  # fmt: skip
    body["metadata"]["annotations"] = {f"note-{i}": "y" * 200 for i in range(15)}
    body["metadata"]["managedFields"] = [{"manager": "x", "fieldsV1": {"f": "y" * 2000}}]
    body["spec"]["containers"][0]["env"] = [
        {"name": f"SETTING_{i}", "value": "x" * 40} for i in range(200)
    ]
    body["spec"]["containers"].append({"name": "sidecar", "image": "y", "args": ["z"] * 50})
    body["status"]["containerStatuses"].append({"name": "sidecar", "restartCount": 7})
    body["status"]["conditions"].append({"type": "PodScheduled", "status": "True"})
    return body


def test_a_slim_pod_reads_the_same_as_the_full_one_at_a_fraction_of_its_size() -> None:
    for body in (
        big_pod(),
        big_pod(terminating=True, ready=False),
        pod_body(),  # small and plain
        {**big_pod(), "spec": {}},  # no containers, no volumes
    ):
        slim = views.slim_pod(body)
        assert views.pod_view(slim) == views.pod_view(body)
        assert views.is_pytorchjob_pod(slim) and views.job_name_of_pod(slim) == "train"
        assert (slim["metadata"].get("ownerReferences") or [{}])[0].get("uid") == (
            body["metadata"].get("ownerReferences") or [{}]
        )[0].get("uid")
    full = big_pod()
    assert len(json.dumps(views.slim_pod(full))) * 10 < len(json.dumps(full))
    mutated = big_pod()
    mutated["metadata"]["annotations"][names.ANNOTATION_MUTATED] = "v1"
    assert views.slim_pod(mutated)["metadata"]["annotations"] == {names.ANNOTATION_MUTATED: "v1"}
    assert "annotations" not in views.slim_pod(big_pod())["metadata"]


def test_a_slim_recovery_keeps_everything_but_managed_fields() -> None:
    body = {"metadata": {"name": "r", "managedFields": [{"m": 1}], "labels": {"a": "b"}},
            "spec": {"x": 1}, "status": {"phase": "Planned"}}  # fmt: skip
    assert views.slim_recovery(body) == {
        "metadata": {"name": "r", "labels": {"a": "b"}},
        "spec": {"x": 1},
        "status": {"phase": "Planned"},
    }
    assert body["metadata"]["managedFields"]  # the input is left alone


class ScriptedApi:
    """A list by continue token, and watch streams played in order: each is a list of
    events, or an exception raised when that watch starts; then the watches are empty."""

    def __init__(self, pages: dict[str, Page], watches: list[Any]) -> None:
        self.pages, self.watches = pages, watches
        self.list_calls: list[str] = []
        self.watch_versions: list[str] = []
        self.done = threading.Event()

    def list_page(
        self, kind: str, namespace: str | None, *, limit: int, continue_token: str = ""
    ) -> Page:
        self.list_calls.append(continue_token)
        return self.pages[continue_token]

    def watch(
        self,
        kind: str,
        namespace: str | None,
        resource_version: str,
        *,
        timeout_seconds: int,
        read_timeout: float,
    ) -> Iterator[WatchEvent]:
        self.watch_versions.append(resource_version)
        if not self.watches:
            self.done.set()
            threading.Event().wait(0.05)
            return
        script = self.watches.pop(0)
        if isinstance(script, Exception):
            raise script
        yield from script


def body(name: str) -> dict[str, Any]:
    return {"metadata": {"name": name}}


def watch_until_done(api: ScriptedApi) -> list[tuple[str | None, str]]:
    got: list[tuple[str | None, str]] = []

    def deliver(batch: Batch) -> None:
        got.extend((event_type, b["metadata"]["name"]) for event_type, b in batch)

    watcher = Watcher(api, "pods", "ns", deliver, page_size=2, backoff=(0.01, 0.01)).start()
    assert api.done.wait(10), (api.list_calls, api.watch_versions)
    watcher.stop(timeout=5)
    return got


def test_it_lists_in_pages_then_watches_from_the_lists_version_and_resumes_from_the_last() -> None:
    api = ScriptedApi(
        {"": Page([body("a"), body("b")], "10", "t1"), "t1": Page([body("c")], "10", "")},
        [
            [WatchEvent("ADDED", "11", body("d")), WatchEvent("BOOKMARK", "15", None)],
            ConnectionResetError("reset"),  # resumed from the last version, not relisted
            [WatchEvent("DELETED", "16", body("a"))],
        ],
    )
    got = watch_until_done(api)
    assert got == [(None, "a"), (None, "b"), (None, "c"), ("ADDED", "d"), ("DELETED", "a")]
    assert api.list_calls == ["", "t1"]
    assert api.watch_versions[:4] == ["10", "15", "15", "16"]


def test_410_gone_lists_again_and_delivers_the_listing_as_a_listing() -> None:
    api = ScriptedApi(
        {"": Page([body("a")], "10", "")},
        [[WatchEvent("MODIFIED", "12", body("a"))], Gone("too old resource version")],
    )
    got = watch_until_done(api)
    assert got == [(None, "a"), ("MODIFIED", "a"), (None, "a")]
    assert api.list_calls == ["", ""]
    assert api.watch_versions[:3] == ["10", "12", "10"]


def test_the_handoff_applies_on_the_loop_and_one_bad_event_spoils_nothing() -> None:
    async def scenario() -> list[str]:
        loop = asyncio.get_running_loop()
        applied: list[str] = []

        def apply(event_type: str | None, b: Any) -> None:
            assert asyncio.get_running_loop() is loop  # on the loop, not the reader's thread
            if b["metadata"]["name"] == "bad":
                raise ValueError("malformed")
            applied.append(b["metadata"]["name"])

        handoff = LoopHandoff(loop, apply, window=1)
        batches: list[Batch] = [[(None, body("a")), (None, body("bad")), (None, body("b"))]]
        batches += [[("ADDED", body(f"n{i}"))] for i in range(5)]
        reader = threading.Thread(target=lambda: [handoff(b) for b in batches])
        reader.start()
        while reader.is_alive():
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        return applied

    assert asyncio.run(scenario()) == ["a", "b", "n0", "n1", "n2", "n3", "n4"]
