"""Kinds of API-server failure, one home for both sides' client layers.

The operator's and the runtime's client modules (the only code that calls the API server)
map every failure to one of these, so callers decide on the kind, never on HTTP codes:
:class:`Unreachable` (connection refused or reset, timeouts, 5xx, 429: try again later),
:class:`Conflict` (409: re-read and re-validate), :class:`Forbidden` (401/403) and
:class:`ApiError` (anything else: retrying will not help).
"""

from __future__ import annotations

__all__ = ["ApiError", "Conflict", "Forbidden", "Unreachable"]


class ApiError(RuntimeError):
    """An API call failed in a way retrying will not fix (the message says how)."""


class Unreachable(ApiError):
    """The API server did not answer, or answered 5xx: worth retrying later."""


class Forbidden(ApiError):
    """401/403: refused. Permanent, except just after the API server restarted, when its
    authorizer may not have loaded RBAC yet."""


class Conflict(ApiError):
    """409: the object changed since it was read (or, on create, exists already)."""
