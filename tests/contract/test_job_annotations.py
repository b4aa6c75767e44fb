"""Reading the PyTorchJob's annotations: defaults, accepted values and clear errors."""

from __future__ import annotations

import pytest

from peer_recovery.contract import names
from peer_recovery.contract.annotations import (
    AnnotationError,
    JobSettings,
    is_enabled,
    parse_job_annotations,
)

ON = {names.ANNOTATION_ENABLED: names.ANNOTATION_ENABLED_VALUE}


def test_defaults_without_annotations() -> None:
    for empty in (None, {}):
        settings = parse_job_annotations(empty)
        assert settings == JobSettings(enabled=False, pods_per_replica=None)
        assert settings.replication == 1
        assert not is_enabled(empty)


def test_enabled_and_pods_per_replica() -> None:
    settings = parse_job_annotations({**ON, names.ANNOTATION_PODS_PER_REPLICA: "4"}, pod_count=8)
    assert settings == JobSettings(enabled=True, pods_per_replica=4)
    assert settings.replication == 4
    assert is_enabled(ON)
    assert (
        parse_job_annotations({**ON, names.ANNOTATION_PODS_PER_REPLICA: " 2 "}).pods_per_replica
        == 2
    )


@pytest.mark.parametrize("value", ["true", "Enabled", "yes", ""])
def test_enabled_with_another_value_is_an_error_not_a_silent_off(value: str) -> None:
    with pytest.raises(AnnotationError, match=rf'peer-recovery={value!r}.*"enabled"'):
        parse_job_annotations({names.ANNOTATION_ENABLED: value})
    assert not is_enabled({names.ANNOTATION_ENABLED: value})


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0", "at least 1"),
        ("-2", "positive whole number"),
        ("two", "positive whole number"),
        ("1.5", "positive whole number"),
        ("", "positive whole number"),
        ("0x2", "positive whole number"),
    ],
)
def test_malformed_pods_per_replica(value: str, message: str) -> None:
    with pytest.raises(AnnotationError, match=message) as caught:
        parse_job_annotations({**ON, names.ANNOTATION_PODS_PER_REPLICA: value})
    assert names.ANNOTATION_PODS_PER_REPLICA in str(caught.value)
    assert repr(value) in str(caught.value)


def test_pods_per_replica_must_divide_the_job() -> None:
    with pytest.raises(AnnotationError, match="3 does not divide the job's 8 pods"):
        parse_job_annotations({**ON, names.ANNOTATION_PODS_PER_REPLICA: "3"}, pod_count=8)
    with pytest.raises(AnnotationError, match="does not divide"):
        parse_job_annotations({**ON, names.ANNOTATION_PODS_PER_REPLICA: "16"}, pod_count=8)
    with pytest.raises(ValueError, match="pod_count"):
        parse_job_annotations({**ON, names.ANNOTATION_PODS_PER_REPLICA: "2"}, pod_count=0)


def test_non_string_value_is_reported() -> None:
    with pytest.raises(AnnotationError, match="annotation values are strings"):
        parse_job_annotations({names.ANNOTATION_PODS_PER_REPLICA: 2})  # type: ignore[dict-item]


def test_the_prefixed_opt_in_is_accepted() -> None:
    prefixed = {names.ANNOTATION_ENABLED_PREFIXED: "true"}
    assert parse_job_annotations(prefixed) == JobSettings(enabled=True)
    assert is_enabled(prefixed)
    assert parse_job_annotations({**ON, **prefixed}).enabled


@pytest.mark.parametrize(
    ("key", "value"),
    [(names.ANNOTATION_ENABLED, "true"), (names.ANNOTATION_ENABLED_PREFIXED, "enabled")],
)
def test_a_wrong_value_names_both_accepted_forms(key: str, value: str) -> None:
    with pytest.raises(AnnotationError) as caught:
        parse_job_annotations({key: value})
    message = str(caught.value)
    assert f"{key}={value!r}" in message
    assert 'peer-recovery: "enabled"' in message
    assert 'peerrecovery.io/enabled: "true"' in message
    assert not is_enabled({key: value})
