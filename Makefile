# peer-recovery: the two commands of the quick start are `make demo` and `make test`.
# Everything a fresh machine needs is installed from here (a virtualenv in .venv; the
# control plane's binaries under ~/.cache/peer-recovery, linked from .tools/bin).

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: help test lint bench tools cluster demo venv clean manifests

help:
	@echo "make demo     run the main job locally: peer recovery of a replaced rank (no cluster)"
	@echo "make test     set up and run the whole test suite"
	@echo "make lint     ruff"
	@echo "make bench    benchmarks, printed as ratios against their anchors"
	@echo "make tools    build the test control plane's binaries from Go modules"
	@echo "make cluster  run the test control plane in the foreground"
	@echo "make manifests  re-render manifests/install.yaml from the chart (default values)"

venv: $(STAMP)

# Reinstall when the project's metadata changes; otherwise reuse the virtualenv as it is.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	@touch $@

# pytest exits 5 when it collects no test; make treats that as the failure it is.
# The control plane's binaries are built first, and cluster tests fail (not skip) without them.
test: venv tools
	PEER_RECOVERY_REQUIRE_CLUSTER=1 $(PY) -m pytest $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Every benchmark script prints ratios against an anchor measured in the same run.
# Add yours with `BENCHMARKS += benchmarks/<name>.py`.
BENCHMARKS := benchmarks/transport.py benchmarks/transport_floor.py benchmarks/snapshot.py
# Needs the control plane (`make tools`).
BENCHMARKS += benchmarks/operator_latency.py

bench: venv tools
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
	@$(PY) -m tests.controlplane $(CLUSTER_ARGS)

# 4 torchrun agents on this machine, one pod replaced; its rank recovers from a peer.
# The last line is `RESULT peer_seconds=... storage_seconds=... bytes=... identical=...`.
demo: venv
	OMP_NUM_THREADS=1 $(PY) -m peer_recovery.demo

# manifests/install.yaml is the chart rendered with default values; a test fails on drift.
manifests: tools
	@manifests/render.sh

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
