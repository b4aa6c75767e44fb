"""The CRD file against the contract, without a cluster: names, enums, printer columns,
descriptions on every field, a structural schema, and agreement with the body builders."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from peer_recovery.contract import names
from peer_recovery.contract.bodies import PodRef, build_peer_recovery, build_status

CRD_PATH = Path(__file__).resolve().parents[2] / "charts/peer-recovery/crds/peerrecoveries.yaml"


@pytest.fixture(scope="module")
def crd() -> dict[str, Any]:
    return yaml.safe_load(CRD_PATH.read_text())


@pytest.fixture(scope="module")
def version(crd: dict[str, Any]) -> dict[str, Any]:
    (only,) = crd["spec"]["versions"]
    return only


@pytest.fixture(scope="module")
def schema(version: dict[str, Any]) -> dict[str, Any]:
    return version["schema"]["openAPIV3Schema"]


def _walk(node: dict[str, Any], path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, node
    for name, child in (node.get("properties") or {}).items():
        yield from _walk(child, f"{path}.{name}")
    if "items" in node:
        yield from _walk(node["items"], f"{path}[]")


def test_names_match_api(crd: dict[str, Any], version: dict[str, Any]) -> None:
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert crd["metadata"]["name"] == f"{names.PLURAL}.{names.GROUP}"
    spec = crd["spec"]
    assert spec["group"] == names.GROUP
    assert spec["scope"] == "Namespaced"
    assert spec["names"] == {
        "kind": names.KIND,
        "listKind": f"{names.KIND}List",
        "plural": names.PLURAL,
        "singular": names.SINGULAR,
        "shortNames": [names.SHORT_NAME],
        "categories": [names.CATEGORY],
    }
    assert version["name"] == names.VERSION
    assert version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}


def test_enums_match_api(schema: dict[str, Any]) -> None:
    spec, status = schema["properties"]["spec"], schema["properties"]["status"]
    assert spec["properties"]["mode"]["enum"] == [m.value for m in names.Mode]
    assert spec["properties"]["reason"]["enum"] == [r.value for r in names.Reason]
    assert spec["properties"]["plannedBy"]["enum"] == [b.value for b in names.PlannedBy]
    assert status["properties"]["phase"]["enum"] == [p.value for p in names.Phase]


def test_contract_fields_are_declared(schema: dict[str, Any]) -> None:
    spec, status = schema["properties"]["spec"], schema["properties"]["status"]
    assert set(spec["properties"]) == {
        "jobName",
        "target",
        "source",
        "mode",
        "reason",
        "attempt",
        "plannedBy",
    }
    pod_fields = {"pod", "podUID", "replicaType", "replicaIndex", "ordinal", "node"}
    assert set(spec["properties"]["target"]["properties"]) == pod_fields
    assert set(spec["properties"]["source"]["properties"]) == pod_fields
    assert "required" not in spec["properties"]["source"]  # empty in Local mode
    assert set(status["properties"]) == {
        "phase",
        "step",
        "bytes",
        "durationSeconds",
        "message",
        "conditions",
        "observedAttempt",
        "kopf",
    }


def test_printer_columns(version: dict[str, Any]) -> None:
    columns = version["additionalPrinterColumns"]
    default = [c["name"].upper() for c in columns if not c.get("priority")]
    assert default == ["JOB", "TARGET", "SOURCE", "MODE", "PHASE", "STEP", "DURATION", "AGE"]
    paths = {c["name"].upper(): c["jsonPath"] for c in columns}
    assert paths["TARGET"] == ".spec.target.pod" and paths["SOURCE"] == ".spec.source.pod"
    assert paths["PHASE"] == ".status.phase" and paths["DURATION"] == ".status.durationSeconds"


def test_every_field_has_a_description(schema: dict[str, Any]) -> None:
    missing = [
        path
        for path, node in _walk(schema, "peerrecovery")
        if path != "peerrecovery.metadata" and not node.get("description", "").strip()
    ]
    assert not missing, f"fields without a description (kubectl explain shows nothing): {missing}"


def test_schema_is_structural(schema: dict[str, Any]) -> None:
    """Every node has a type, so the API server accepts it and prunes unknown fields."""
    untyped = [path for path, node in _walk(schema, "peerrecovery") if "type" not in node]
    assert not untyped
    status = schema["properties"]["status"]
    # kopf's bookkeeping and handler results land under status; they must survive.
    assert status["x-kubernetes-preserve-unknown-fields"] is True
    assert status["properties"]["kopf"]["x-kubernetes-preserve-unknown-fields"] is True
    assert "x-kubernetes-preserve-unknown-fields" not in schema["properties"]["spec"]


def _conforms(value: Any, node: dict[str, Any], path: str) -> None:
    """A small check of ``value`` against the schema: known keys, types, enums, required."""
    kind = node["type"]
    expected = {"object": dict, "string": str, "integer": int, "number": (int, float)}[kind]
    assert isinstance(value, expected), f"{path}: {value!r} is not {kind}"
    if "enum" in node:
        assert value in node["enum"], f"{path}: {value!r} not in {node['enum']}"
    if kind == "object" and "properties" in node:
        for key in node.get("required", []):
            assert key in value, f"{path}: missing {key}"
        for key, item in value.items():
            assert key in node["properties"], f"{path}: {key} is not declared"
            _conforms(item, node["properties"][key], f"{path}.{key}")


def test_built_bodies_conform_to_the_schema(schema: dict[str, Any]) -> None:
    target = PodRef("j-worker-0", "u1", "worker", 0, 1, node="n1")
    source = PodRef("j-master-0", "u0", "master", 0, 0)
    for mode, src in ((names.Mode.PEER, source), (names.Mode.PEER, None), (names.Mode.LOCAL, None)):
        body = build_peer_recovery(
            namespace="ns",
            job_name="j",
            job_uid="uid",
            target=target,
            source=src,
            mode=mode,
            reason=names.Reason.CONTAINER_RESTARTED,
            attempt=3,
            planned_by=names.PlannedBy.RUNTIME,
        )
        _conforms(body["spec"], schema["properties"]["spec"], "spec")
    for phase in names.Phase:
        status = build_status(
            phase, attempt=1, message="m", step=5, bytes_moved=9, duration_seconds=0.5
        )
        _conforms(status, schema["properties"]["status"], "status")
