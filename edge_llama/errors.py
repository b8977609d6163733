"""One small error hierarchy with stable codes.

Library code raises these; the daemon turns them into protocol `error` lines (the `code` is the wire code),
the CLI into one clear message and a non-zero exit (`exit_code`). Codes are part of the protocol contract:
never rename one.
"""

from __future__ import annotations

from typing import Any


class EdgeLlamaError(Exception):
    """Base of every error edge-llama raises on purpose."""

    code = "internal"
    exit_code = 1

    def __init__(self, message: str, *, retry_after_ms: int | None = None, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_ms = retry_after_ms
        self.field = field  # the request field at fault, when one is (an API names it: OpenAI's `param`)


# --- wire codes (protocol v1) -------------------------------------------------------------------------------
class BadJson(EdgeLlamaError):
    code = "bad_json"


class BadRequest(EdgeLlamaError):
    code = "bad_request"


class TooLarge(EdgeLlamaError):
    code = "too_large"


class ContextOverflow(EdgeLlamaError):
    code = "context_overflow"


class Busy(EdgeLlamaError):
    code = "busy"


class Forbidden(EdgeLlamaError):
    code = "forbidden"


class SafetyBlocked(EdgeLlamaError):
    code = "safety_blocked"


class Unavailable(EdgeLlamaError):
    """The daemon is not running, not ready, or shutting down."""

    code = "unavailable"
    exit_code = 3


class Cancelled(EdgeLlamaError):
    code = "cancelled"


class NotFound(EdgeLlamaError):
    """A session this peer's uid has not got (sessions belong to the uid that created them)."""

    code = "not_found"


class InternalError(EdgeLlamaError):
    code = "internal"


# --- local codes (never on the wire) ------------------------------------------------------------------------
class ConfigError(EdgeLlamaError):
    code = "config"
    exit_code = 2


class ModelError(EdgeLlamaError):
    """A model file is missing, unreadable, or of the wrong kind; or a backend library is absent."""

    code = "model"
    exit_code = 2


class SocketInUse(EdgeLlamaError):
    code = "socket_in_use"
    exit_code = 2


WIRE_ERRORS: dict[str, type[EdgeLlamaError]] = {
    cls.code: cls
    for cls in (BadJson, BadRequest, TooLarge, ContextOverflow, Busy, Forbidden, SafetyBlocked, Unavailable,
                Cancelled, NotFound, InternalError)
}


def from_wire(event: dict[str, Any]) -> EdgeLlamaError:
    """Rebuild the typed error of an `error` line a daemon sent (client side)."""
    cls = WIRE_ERRORS.get(event["code"], InternalError)
    return cls(event["message"], retry_after_ms=event.get("retry_after_ms"), field=event.get("field"))
