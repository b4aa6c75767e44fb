"""Tests of the test control plane itself, and its pytest fixtures (``fixtures``); the
control plane is ``testbed.controlplane``."""
