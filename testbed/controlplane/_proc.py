"""One control-plane component as a child process: started in its own process group with its
output in a log file, stopped by signalling the whole group.

Invariants: a component is started in a new session (so its process group id is its pid and
Ctrl-C in a terminal reaches only the parent, which stops the children in order); on Linux the
child also gets SIGKILL if the process that started it dies, so a killed pytest leaves nothing
behind; ``stop()`` returns only when the group is gone (SIGTERM, then SIGKILL after a grace
period) and the child has been reaped.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["Component", "group_alive"]

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Run in the child before exec: ask the kernel for SIGKILL when the parent dies."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(
                _PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0
            )


def group_alive(pgid: int) -> bool:
    """Whether any process of the process group ``pgid`` still exists (zombies included)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Component:
    """A named command run in the background, logging to ``log_dir/<name>.log``."""

    def __init__(
        self, name: str, argv: list[str], log_dir: Path, env: dict[str, str] | None = None
    ) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_dir / f"{name}.log"
        self._env = env
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """The process id (also its process group id) while started, else None."""
        return self._process.pid if self._process else None

    def start(self) -> None:
        """Start the process; appends to the log so a restart keeps the earlier output."""
        if self.running():
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        with self.log_path.open("ab") as log:
            log.write(f"\n=== start {time.strftime('%H:%M:%S')}: {' '.join(self.argv)}\n".encode())
            log.flush()
            self._process = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._env,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )

    def running(self) -> bool:
        """Whether the process has been started and has not exited."""
        return self._process is not None and self._process.poll() is None

    def exit_code(self) -> int | None:
        """The exit status once the process has exited, else None."""
        return None if self._process is None else self._process.poll()

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM the process group, SIGKILL it after ``grace_s``, and reap the child."""
        process = self._process
        if process is None:
            return
        pgid = process.pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            process.wait(timeout=grace_s)
        # Grandchildren (none expected) that outlived the leader get the same treatment.
        deadline = time.monotonic() + grace_s
        while group_alive(pgid) and time.monotonic() < deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            time.sleep(0.05)
        self._process = None

    def log_tail(self, lines: int = 30, width: int = 400) -> str:
        """The last ``lines`` lines of the component's log, each cut to ``width`` characters,
        for error messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        tail = text.splitlines()[-lines:]
        return "\n".join(line if len(line) <= width else line[:width] + " [...]" for line in tail)
