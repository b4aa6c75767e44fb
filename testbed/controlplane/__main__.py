"""`make cluster`: run the test control plane in the foreground until Ctrl-C (or SIGTERM).

The only line on stdout is ``export KUBECONFIG=<path>``; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from testbed.controlplane import ControlPlane, MissingBinariesError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testbed.controlplane", description=__doc__)
    parser.add_argument("--nodes", type=int, default=4, help="nodes (default 4)")
    parser.add_argument("--zones", type=int, default=2, help="zones they spread over (default 2)")
    parser.add_argument(
        "--real-controller",
        action="store_true",
        help="run the Kubeflow training-operator, kube-scheduler and the test kubelet on "
        "local nodes instead of KWOK's fake nodes",
    )
    args = parser.parse_args(argv)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda *_: stop.set())
    try:
        plane = ControlPlane(
            nodes=args.nodes, zones=args.zones, real_controller=args.real_controller
        )
    except MissingBinariesError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"starting the test control plane in {plane.work_dir} ...", file=sys.stderr)
    try:
        plane.start()
    except RuntimeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    try:
        print(
            f"ready in {plane.startup_seconds:.1f}s: {plane.server}, nodes {', '.join(plane.nodes)};"
            f" logs in {plane.log_dir}; Ctrl-C stops it",
            file=sys.stderr,
        )
        print(f"export KUBECONFIG={plane.kubeconfig}", flush=True)
        while not stop.wait(1.0):
            exited = plane.exited()
            if exited:
                print(f"error: {exited}", file=sys.stderr)
                return 1
    finally:
        print("stopping the test control plane ...", file=sys.stderr)
        plane.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
