"""A TCP proxy on 127.0.0.1 in front of the API server that can stall its connections.

:meth:`StallingProxy.stall` makes every connection open at that moment stop forwarding
while it stays open: to the client it is a half-open connection (no data, no FIN, no
RST), which is what a dead NAT entry or a partitioned node looks like. Connections opened
afterwards pass normally. TLS passes through untouched (the proxy only copies bytes), so
the client still verifies the API server's certificate for 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from pathlib import Path

import yaml

__all__ = ["StallingProxy"]


class StallingProxy:
    def __init__(self, target_port: int) -> None:
        self._target = ("127.0.0.1", target_port)
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = int(self._listener.getsockname()[1])
        self._generation = 0  # connections of a generation below this are stalled
        self._stalled_below = 0
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True, name="stalling-proxy").start()

    def kubeconfig(self, original: Path, out: Path) -> Path:
        """``original`` with its server pointed at the proxy."""
        config = yaml.safe_load(original.read_text())
        for cluster in config["clusters"]:
            cluster["cluster"]["server"] = f"https://127.0.0.1:{self.port}"
        out.write_text(yaml.safe_dump(config))
        return out

    def stall(self) -> None:
        """Stop forwarding on every connection open now; later ones pass."""
        with self._lock:
            self._stalled_below = self._generation = self._generation + 1

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in [self._listener, *sockets]:
            with contextlib.suppress(OSError):
                sock.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
                upstream = socket.create_connection(self._target, timeout=10)
            except OSError:
                continue
            upstream.settimeout(None)
            with self._lock:
                generation = self._generation
                self._sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(
                    target=self._pump, args=(src, dst, generation), daemon=True
                ).start()

    def _pump(self, src: socket.socket, dst: socket.socket, generation: int) -> None:
        try:
            while not self._closed.is_set():
                if generation < self._stalled_below:
                    self._closed.wait(0.5)  # stalled: read nothing, send nothing, close nothing
                    continue
                data = src.recv(65536)
                if not data:
                    break
                if generation < self._stalled_below:
                    continue  # stalled mid-read: drop it, as a dead path would
                dst.sendall(data)
        except OSError:
            pass
        finally:
            if generation >= self._stalled_below:
                for sock in (src, dst):
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)
