"""The webhook's HTTPS server over real TLS, against the one fake API server for the faults
the real control plane cannot show on cue: the API server unreachable from the webhook, a
job that is gone, the mutation itself failing. In each the pod is admitted, never refused."""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import aiohttp

from peer_recovery.contract import names
from peer_recovery_operator.certs import make_self_signed, server_context, write_files
from peer_recovery_operator.mutation import MutationSettings
from peer_recovery_operator.webhook import PATH, REASON_WARNING, WebhookServer
from testbed.operator_process import free_port
from tests.fake_api import FakeApi

ON = {names.ANNOTATION_ENABLED: names.ANNOTATION_ENABLED_VALUE}


def review(uid: str, pod: str, *, job: str = "j", operation: str = "CREATE") -> dict[str, Any]:
    body = {
        "metadata": {"name": pod, "labels": {names.LABEL_JOB_NAME: job}},
        "spec": {"containers": [{"name": "pytorch", "image": "x"}]},
    }
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {"uid": uid, "operation": operation, "namespace": "a",
                    "kind": {"group": "", "version": "v1", "kind": "Pod"}, "object": body},
    }  # fmt: skip


def answers(api: FakeApi, tmp_path: Path, reviews: list[dict[str, Any]], **kw: Any) -> list[Any]:
    """Serve the webhook on loopback and post ``reviews`` to it over TLS; the responses."""
    cert = make_self_signed(["127.0.0.1"], now=datetime.now(timezone.utc), common_name="t")
    context = server_context(*write_files(cert, tmp_path))
    client = ssl.create_default_context(cadata=cert.ca_pem.decode())
    port = free_port()

    async def run() -> list[Any]:
        settings = MutationSettings(service_account="", version="9")
        server = WebhookServer(api, settings, context, "127.0.0.1", port, **kw)
        await server.start()
        try:
            async with aiohttp.ClientSession() as session:
                out = []
                for body in reviews:
                    url = f"https://127.0.0.1:{port}{PATH}"
                    async with session.post(url, json=body, ssl=client) as response:
                        assert response.status == 200
                        out.append((await response.json())["response"])
                return out
        finally:
            await server.stop()

    return asyncio.run(run())


def patch_of(response: dict[str, Any]) -> list[dict[str, Any]]:
    return json.loads(base64.b64decode(response["patch"])) if "patch" in response else []


def test_pods_of_an_opted_in_job_get_a_patch_and_warnings_once_per_job(tmp_path: Path) -> None:
    api = FakeApi()
    api.jobs[("a", "j")] = {
        "metadata": {"name": "j", "namespace": "a", "uid": "u", "annotations": ON}
    }
    first, second, other = answers(
        api,
        tmp_path,
        [
            review("1", "j-worker-0"),
            review("2", "j-worker-1"),
            review("3", "k-worker-0", job="k"),
        ],
    )
    assert first["uid"] == "1" and first["allowed"] is True and first["patchType"] == "JSONPatch"
    assert any(op["path"] == "/metadata/annotations" for op in patch_of(first))
    assert "no memory limit" in first["warnings"][0]  # warned to the client every time ...
    assert second["warnings"] == first["warnings"]
    warned = [e for e in api.events if e["reason"] == REASON_WARNING]
    assert len(warned) == 1 and warned[0]["involved"]["name"] == "j"  # ... posted once
    assert other == {"uid": "3", "allowed": True}  # job k does not exist: left as it is


def test_the_api_server_unreachable_admits_the_pod_unchanged(tmp_path: Path) -> None:
    api = FakeApi()
    api.down = True
    (response,) = answers(api, tmp_path, [review("1", "j-worker-0")])
    assert response == {"uid": "1", "allowed": True}


def test_a_failing_mutation_admits_the_pod_unchanged(tmp_path: Path) -> None:
    api = FakeApi()
    api.jobs[("a", "j")] = {"metadata": {"name": "j", "namespace": "a", "annotations": ON}}

    def broken(*_: Any) -> Any:
        raise RuntimeError("bug")

    responses = answers(
        api, tmp_path, [review("1", "j-worker-0"), review("2", "p", operation="UPDATE")],
        mutate=broken,
    )  # fmt: skip
    assert responses == [{"uid": "1", "allowed": True}, {"uid": "2", "allowed": True}]
