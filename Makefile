# peer-recovery: the two commands of the quick start are `make demo` and `make test`.
# Everything a fresh machine needs is installed from here (a virtualenv in .venv; the
# control plane's binaries under ~/.cache/peer-recovery, linked from .tools/bin).

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# The ends of the runtime extra's torch range (pyproject.toml): `make test` runs against the
# newest release, `make test-compat` the transport, snapshot and restore suites against the
# oldest, in a second virtualenv. tests/transport/test_torch_compat.py keeps them in step.
TORCH_NEWEST := 2.15.0
TORCH_OLDEST := 2.9.1
COMPAT_VENV ?= .venv-compat
COMPAT_PY := $(COMPAT_VENV)/bin/python
COMPAT_STAMP := $(COMPAT_VENV)/.installed
COMPAT_SUITES := tests/transport tests/snapshots tests/peer_restore

.PHONY: help test test-compat lint bench tools cluster demo venv venv-compat clean manifests images

help:
	@echo "make demo     run the main job locally: peer recovery of a replaced rank (no cluster)"
	@echo "make test     set up and run the whole test suite (torch $(TORCH_NEWEST))"
	@echo "make test-compat  the transport, snapshot and restore suites on torch $(TORCH_OLDEST)"
	@echo "make lint     ruff, and the import layers (import-linter)"
	@echo "make bench    benchmarks, printed as ratios against their anchors"
	@echo "make tools    build the test control plane's binaries from Go modules"
	@echo "make cluster  run the test control plane in the foreground"
	@echo "make manifests  re-render manifests/install.yaml from the chart (default values)"
	@echo "make images  build the operator and example trainer images (needs docker, podman,"
	@echo "             nerdctl or buildah; says so and fails without one)"

venv: $(STAMP)

# Reinstall when the project's metadata (or a torch pin here) changes; otherwise reuse the
# virtualenv as it is. torch is named exactly, so an existing virtualenv moves with the pin.
$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]" "torch==$(TORCH_NEWEST)"
	@touch $@

venv-compat: $(COMPAT_STAMP)

$(COMPAT_STAMP): pyproject.toml Makefile
	@test -x $(COMPAT_PY) || $(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_PY) -m pip install --quiet --upgrade pip
	$(COMPAT_PY) -m pip install --quiet -e ".[test]" "torch==$(TORCH_OLDEST)"
	@touch $@

# pytest exits 5 when it collects no test; make treats that as the failure it is.
# The control plane's binaries are built first, and cluster tests fail (not skip) without them.
test: venv tools
	PEER_RECOVERY_REQUIRE_CLUSTER=1 PEER_RECOVERY_EXPECT_TORCH=$(TORCH_NEWEST) $(PY) -m pytest $(PYTEST_ARGS)

# The oldest supported torch: the suites that touch torch.distributed's APIs (the private
# ones are in runtime/peer_recovery/transport/torch_compat.py). Exit status 5 fails here too.
test-compat: venv-compat
	PEER_RECOVERY_EXPECT_TORCH=$(TORCH_OLDEST) $(COMPAT_PY) -m pytest $(COMPAT_SUITES) $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

# Every benchmark script prints ratios against an anchor measured in the same run.
# Add yours with `BENCHMARKS += benchmarks/<name>.py`.
BENCHMARKS := benchmarks/transport.py benchmarks/transport_floor.py benchmarks/snapshot.py
BENCHMARKS += benchmarks/peer_restore.py
# Needs the control plane (`make tools`).
BENCHMARKS += benchmarks/operator_latency.py
# The round's exchange at 1,024 simulated ranks; the storage anchors (needs the bench extra).
BENCHMARKS += benchmarks/round_scale.py benchmarks/storage_anchor.py

bench: venv tools
	@$(PY) -c "import moto, s3fs" 2>/dev/null || $(PY) -m pip install --quiet -e ".[bench]"
	@set -e; for b in $(BENCHMARKS); do echo "== $$b"; $(PY) $$b; done

# Builds etcd, kube-apiserver/-controller-manager/-scheduler/kubectl, helm, kwok and the
# Kubeflow training-operator from the pins in
# tools/versions.env into ~/.cache/peer-recovery/<key>/ and links them as .tools/bin/<name>.
tools:
	@tools/build.sh

# Runs the test control plane in the foreground. Its only stdout line is
# `export KUBECONFIG=...` (progress goes to stderr); Ctrl-C stops it. By default it runs the
# real training-operator, kube-scheduler and the test kubelet; `make cluster CLUSTER_ARGS=`
# runs KWOK's fake nodes instead.
CLUSTER_ARGS ?= --real-controller
cluster:
	@$(MAKE) --no-print-directory venv >&2
	@tools/build.sh >&2
	@$(PY) -m testbed.controlplane $(CLUSTER_ARGS)

# 4 torchrun agents on this machine, one pod replaced; its rank recovers from a peer.
# The last line is `RESULT peer_seconds=... storage_seconds=... bytes=... identical=...`.
demo: venv
	OMP_NUM_THREADS=1 $(PY) -m peer_recovery.demo

# manifests/install.yaml is the chart rendered with default values; a test fails on drift.
manifests: tools
	@manifests/render.sh

# ghcr.io/peer-recovery/{operator,trainer}:<version> from operator/Dockerfile and
# examples/trainer/Dockerfile; IMAGE_REGISTRY=... and CONTAINER_BUILDER=... change them.
images:
	@tools/images.sh

clean:
	rm -rf $(VENV) $(COMPAT_VENV) .pytest_cache .ruff_cache
