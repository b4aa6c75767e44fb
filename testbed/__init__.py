"""The test bed: what the tests, the benchmarks and ``make cluster`` run against.

``controlplane`` runs a real Kubernetes control plane on loopback (built by ``make tools``);
``operator_process`` runs the real operator under the chart's RBAC. Nothing here is part of
the ``peer-recovery`` distribution; ``tests/`` and ``benchmarks/`` both import it, and
neither imports the other.
"""
