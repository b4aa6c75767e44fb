"""``python -m peer_recovery_operator``: the same as the ``peer-recovery-operator`` script."""

from peer_recovery_operator.cli import main

raise SystemExit(main())
