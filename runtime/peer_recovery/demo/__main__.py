"""``python -m peer_recovery.demo [--quick]``: see :mod:`peer_recovery.demo.driver`."""

from peer_recovery.demo.driver import main

raise SystemExit(main())
