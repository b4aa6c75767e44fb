"""What the operator's own paged lists and watches deliver (pure types; the calls are in
:mod:`peer_recovery_operator.kube`, the loop around them in
:mod:`peer_recovery_operator.watcher`).

The kinds listed and watched this way, pods and PeerRecoveries, are cut as they are decoded
to the fields the operator reads (:data:`SLIM`), so the rest of the operator never sees a
full body. :class:`WatchApi` is the seam the watcher depends on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

from peer_recovery.contract.errors import ApiError
from peer_recovery_operator import views

__all__ = [
    "PAGE_SIZE",
    "SLIM",
    "WATCH_CONNECT_TIMEOUT",
    "Gone",
    "Page",
    "WatchApi",
    "WatchEvent",
    "lines",
]

#: Seconds to wait for a watch's connection (its read timeout is the caller's).
WATCH_CONNECT_TIMEOUT = 10.0
#: Objects per page of the operator's own lists (pods of 10-30 KB: a page is at most
#: ~1.5 MB of JSON, a few times that once decoded, and only one page is decoded at a time).
PAGE_SIZE = 50
#: The kinds listed and watched here, with what each body is cut to.
SLIM: dict[str, Callable[[Mapping[str, Any]], dict[str, Any]]] = {
    "pods": views.slim_pod,
    "peerrecoveries": views.slim_recovery,
}


class Gone(ApiError):
    """410 Gone: the resourceVersion (or the list's continue token) is too old; relist."""


@dataclasses.dataclass(frozen=True)
class Page:
    """One page of a list: slim bodies, the list's resourceVersion, the continue token
    ("" on the last page)."""

    items: list[dict[str, Any]]
    resource_version: str
    continue_token: str


@dataclasses.dataclass(frozen=True)
class WatchEvent:
    """``type`` is ADDED, MODIFIED, DELETED or BOOKMARK (``body`` None); ``resource_version``
    is the object's, from which the watch resumes."""

    type: str
    resource_version: str
    body: dict[str, Any] | None


class WatchApi(Protocol):
    """Paged lists and watches of ``kind`` (a key of :data:`SLIM`), bodies already slim."""

    def list_page(
        self, kind: str, namespace: str | None, *, limit: int, continue_token: str = ""
    ) -> Page: ...

    def watch(
        self,
        kind: str,
        namespace: str | None,
        resource_version: str,
        *,
        timeout_seconds: int,
        read_timeout: float,
    ) -> Iterator[WatchEvent]:
        """The events after ``resource_version`` until the server ends the watch after
        ``timeout_seconds``; :class:`Gone` when that version is too old; a connection
        silent for ``read_timeout`` seconds raises."""
        ...


def lines(response: Any) -> Iterator[str]:
    """The lines of a streamed (chunked) response, each as soon as it is complete."""
    buffer = b""
    for chunk in response.stream(amt=None, decode_content=False):
        buffer += chunk
        *complete, buffer = buffer.split(b"\n")
        for line in complete:
            if line.strip():
                yield line.decode("utf-8", errors="replace")
    if buffer.strip():
        yield buffer.decode("utf-8", errors="replace")
