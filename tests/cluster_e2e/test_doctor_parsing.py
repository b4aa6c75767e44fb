"""What ``peer-recovery doctor`` reads from a manifest with libraries that already know the
rules: quantities with the Kubernetes client's parser, torchrun's flags with torchrun's own
parser (and a fallback for the torch-free ``peer-recovery[cli]`` install)."""

from __future__ import annotations

import sys

import pytest

from peer_recovery import doctor
from peer_recovery.doctor import PodFacts, Shm


@pytest.mark.parametrize(
    ("text", "size"),
    [("8Gi", 8 * 2**30), ("1.5Gi", 3 * 2**29), ("500M", 5 * 10**8), ("1e9", 10**9),
     (4096, 4096), ("0.5Ki", 512), ("100m", 1), ("0", 0)],
)  # fmt: skip
def test_quantities_as_the_api_server_reads_them(text: str | int, size: int) -> None:
    assert doctor.parse_quantity(text) == size


@pytest.mark.parametrize(
    ("text", "message"),
    [("8GiB", "'8GiB' is not a quantity"), ("lots", "'lots' is not a quantity"),
     ("", "'' is not a quantity"), (True, "True is not a quantity"),
     ("-1Gi", "'-1Gi' is negative")],
)  # fmt: skip
def test_bad_quantities_are_named(text: str | bool, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        doctor.parse_quantity(text)


def check(command: list[str], env: dict[str, str] | None = None) -> doctor.Check:
    return doctor.check_torchrun(PodFacts("p", env or {}, Shm(False), True, "sa", command))


GOOD = ["torchrun", "--rdzv-backend=peer-recovery", "--rdzv-id=j", "--nnodes=2"]


def test_torchrun_reads_abbreviated_flags_as_torchrun_does() -> None:
    """torchrun accepts a unique prefix of a flag (argparse's abbreviations): the doctor,
    using torchrun's parser, sees ``--max-restart=3`` as --max-restarts."""
    pytest.importorskip("torch")
    result = check([*GOOD, "--max-restart=3", "train.py", "--max-restarts=0"])
    assert result.ok is True, result
    assert "--max-restarts=3" in result.detail


def test_this_processes_pet_variables_do_not_count(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchrun's parser takes defaults from PET_* of the process that builds it; checking a
    manifest, only the pod's own variables count."""
    pytest.importorskip("torch")
    monkeypatch.setenv("PET_MAX_RESTARTS", "5")
    monkeypatch.setenv("PET_NNODES", "1:8")
    result = check([*GOOD, "train.py"])
    assert result.ok is False and "--max-restarts is 0" in result.detail, result
    assert "--nnodes is" not in result.detail
    from_pod = check([*GOOD, "train.py"], {"PET_MAX_RESTARTS": "2"})
    assert from_pod.ok is True, from_pod


def test_without_torch_the_flags_are_still_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where torch is absent (``peer-recovery[cli]``), both spellings and both forms are
    still read; an abbreviation is not, and the check says what it misses."""
    monkeypatch.setitem(sys.modules, "torch.distributed.run", None)  # import fails
    assert check([*GOOD, "--max_restarts", "2", "train.py", "--max-restarts=0"]).ok is True
    abbreviated = check([*GOOD, "--max-restart=3", "train.py"])
    assert abbreviated.ok is False and "--max-restarts is 0" in abbreviated.detail
    assert check([*GOOD, "train.py"], {"PET_MAX_RESTARTS": "1"}).ok is True


def test_a_line_torchrun_refuses_falls_back_to_reading_by_hand() -> None:
    """No training script: torchrun's parser refuses the line; the flags are still read."""
    result = check([*GOOD, "--max-restarts=1"])
    assert result.ok is True, result
