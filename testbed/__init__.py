"""The test bed: what the tests, the benchmarks and ``make cluster`` run against.

``operator_process`` runs the real operator under the chart's RBAC. Nothing here is part of
the ``peer-recovery`` distribution; tests under ``tests/`` and ``benchmarks/`` both import it,
and neither imports the other.
"""
