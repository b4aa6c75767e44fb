"""Lists, then watches, pods or PeerRecoveries on a thread of its own, handing the event
loop slim bodies.

Why not kopf's watch for these two kinds: kopf decodes every object on the event loop and
keeps each object's latest body in a per-object worker until that worker has idled for
5 s, so listing thousands of pods of 10-30 KB holds all of their bodies at once (the
operator's peak memory was 2.6-4.9x its idle size). Here a body is decoded by
:mod:`peer_recovery_operator.kube`, cut to the fields the operator reads
(:func:`~peer_recovery_operator.views.slim_pod`) and dropped before the next one is read;
the decoding also stays off the loop.

The protocol is client-go's reflector's:

1. List in pages (``page_size``); each page is handed over before the next is requested.
   Listed objects are delivered with type None, as kopf delivers its listings: the catch-up
   rule tells pods that predate the operator from live ``ADDED`` events by it.
2. Watch from the list's resourceVersion, with bookmarks keeping it fresh; when the server
   ends the watch (``server_timeout``), watch again from the last version seen.
3. ``410 Gone`` (that version is too old, or a continue token expired): list again (1).
   Objects deleted meanwhile yield no ``DELETED``; the periodic resync finds them.
4. Any other failure (a reset connection, a connection silent for ``client_timeout``, a
   5xx): watch again from the last version after a delay doubling from 0.5 s up to 30 s
   (list again if no list has completed yet).

``deliver`` is called on this thread with a batch of ``(type, body)`` and may block: with
:class:`LoopHandoff` it hands the batch to the loop and waits once ``window`` batches are
outstanding, so a loop that falls behind slows the reading instead of piling up bodies.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

from peer_recovery_operator.kube_watch import Gone, WatchApi

__all__ = ["Batch", "LoopHandoff", "Watcher"]

logger = logging.getLogger(__name__)

#: What one hand-over carries: (event type, None for a listed object; slim body).
Batch = list[tuple[str | None, Mapping[str, Any]]]


class Watcher:
    def __init__(
        self,
        api: WatchApi,
        kind: str,
        namespace: str | None,
        deliver: Callable[[Batch], None],
        *,
        page_size: int = 100,
        server_timeout: int = 60,
        client_timeout: float = 90.0,
        backoff: tuple[float, float] = (0.5, 30.0),
    ) -> None:
        self.kind, self.namespace = kind, namespace
        self._api, self._deliver = api, deliver
        self._page_size = page_size
        self._server_timeout, self._client_timeout = server_timeout, client_timeout
        self._backoff = backoff
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: Lists made so far (the first, and one per 410 Gone): for tests and logs.
        self.lists = 0

    def start(self) -> Watcher:
        self._thread = threading.Thread(
            target=self.run, name=f"watch-{self.kind}-{self._where()}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self, timeout: float = 0.0) -> None:
        """Stop after the event being read (a blocked read ends with the server's watch
        timeout at the latest; the thread is a daemon, so it never holds the process)."""
        self._stop.set()
        if self._thread is not None and timeout:
            self._thread.join(timeout)

    def run(self) -> None:
        version = ""
        delay = self._backoff[0]
        while not self._stop.is_set():
            try:
                if not version:
                    version = self._list()
                version = self._watch(version)
                delay = self._backoff[0]
            except Gone as error:
                logger.info("%s watch (%s): %s; listing again", self.kind, self._where(), error)
                version = ""
            except Exception as error:  # a reset connection, a silent one, a 5xx: resume
                logger.warning(
                    "%s watch (%s) failed: %s; resuming in %.1fs",
                    self.kind,
                    self._where(),
                    error,
                    delay,
                )
                self._stop.wait(delay)
                delay = min(delay * 2, self._backoff[1])

    def _list(self) -> str:
        """Steps 1 and 3: list in pages, hand each over; the list's resourceVersion."""
        token, version = "", ""
        while not self._stop.is_set():
            page = self._api.list_page(
                self.kind, self.namespace, limit=self._page_size, continue_token=token
            )
            version = page.resource_version or version
            if page.items:
                self._deliver([(None, body) for body in page.items])
            token = page.continue_token
            if not token:
                break
        self.lists += 1
        return version

    def _watch(self, version: str) -> str:
        """Step 2: the events after ``version``; the last version seen."""
        events = self._api.watch(
            self.kind,
            self.namespace,
            version,
            timeout_seconds=self._server_timeout,
            read_timeout=self._client_timeout,
        )
        for event in events:
            version = event.resource_version or version
            if event.body is not None:
                self._deliver([(event.type, event.body)])
            if self._stop.is_set():
                break
        return version

    def _where(self) -> str:
        return self.namespace or "all namespaces"


class LoopHandoff:
    """``deliver`` for a :class:`Watcher`: on ``loop``, calls ``apply(type, body)`` for each
    event of a batch; blocks the calling thread while ``window`` batches are still waiting
    for the loop. An event ``apply`` raises on is logged and skipped."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        apply: Callable[[str | None, Mapping[str, Any]], None],
        window: int = 64,
    ) -> None:
        self._loop, self._apply, self._window = loop, apply, window
        self._pending: collections.deque[concurrent.futures.Future[None]] = collections.deque()

    def __call__(self, batch: Batch) -> None:
        while self._pending and (self._pending[0].done() or len(self._pending) >= self._window):
            oldest = self._pending.popleft()
            try:
                oldest.result(timeout=None if oldest.done() else 60.0)
            except concurrent.futures.TimeoutError:
                self._pending.appendleft(oldest)  # the loop is stuck or gone: keep waiting
                if self._loop.is_closed():
                    raise RuntimeError("the event loop is closed") from None
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._loop.call_soon_threadsafe(self._run, batch, done)
        self._pending.append(done)

    def _run(self, batch: Batch, done: concurrent.futures.Future[None]) -> None:
        for event_type, body in batch:
            try:
                self._apply(event_type, body)
            except Exception:  # one bad event must not stop the others, nor the watch
                logger.exception("handling a %s watch event failed", event_type or "listed")
        done.set_result(None)
