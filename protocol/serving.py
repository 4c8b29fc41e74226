"""The limits every Imago HTTP server (matcher, node, gateway) runs under.

``ServerLimits`` holds them as settings with safe defaults; each party's CLI exposes
them (``add_limit_arguments``/``limits_from_args``) and its app factory stores them on
the app (``LIMITS``). aiohttp applies the head limits (line, field and header count)
and the idle timeout; ``read_body`` applies the body deadline and size cap, so a
handler reads a body only through it.

aiohttp has one timer for a connection that is waiting for a request: the idle timeout
runs from the connection's start (or its last answer) until a request head is complete.
So the idle timeout is also the deadline for a slow request head.

A request whose head breaks a limit gets aiohttp's 4xx (400, or 431 for too many
header fields) and one WARNING line naming it, not an ERROR with a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from dataclasses import dataclass, fields
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from protocol.errors import ApiError

__all__ = [
    "LIMITS",
    "ServerLimits",
    "add_limit_arguments",
    "limits_from_args",
    "read_body",
    "read_json",
]


@dataclass(frozen=True)
class ServerLimits:
    # A connection with no complete request head for this long is closed: both idle
    # keep-alive connections and slowly sent heads. Above the 60 s that Imago's own
    # clients keep an idle connection, so they never reuse one the server just closed.
    idle_timeout_s: float = 75.0
    # A request body must arrive within this, or the answer is 408.
    body_timeout_s: float = 30.0
    max_body_bytes: int = 16 * 1024 * 1024  # larger: 413
    max_line_size: int = 8190  # the request line, and each header line
    max_field_size: int = 8190
    max_headers: int = 100

    def runner_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``web.AppRunner`` or ``web.run_app``."""
        return {
            "keepalive_timeout": self.idle_timeout_s,
            "max_line_size": self.max_line_size,
            "max_field_size": self.max_field_size,
            "max_headers": self.max_headers,
            # After an early answer (408, 413, 403...), unread body is drained this long
            # before the connection closes: aiohttp's 10 s would hold a slow sender.
            "lingering_time": 2.0,
            "logger": _ServerLog(logging.getLogger("imago.http"), {}),
        }


LIMITS = web.AppKey("imago_server_limits", ServerLimits)


async def read_body(request: web.Request) -> bytes:
    """The request body, under the app's body deadline and size cap (408, 413)."""
    limits = request.app.get(LIMITS) or ServerLimits()
    if request.content_length is not None and request.content_length > limits.max_body_bytes:
        raise _too_large(limits)
    try:
        async with asyncio.timeout(limits.body_timeout_s):
            body = await request.read()
    except TimeoutError:
        raise ApiError(
            408,
            f"the request body did not arrive within {limits.body_timeout_s:g} s",
            "invalid_request_error",
            "body_timeout",
        ) from None
    if len(body) > limits.max_body_bytes:  # client_max_size normally refuses it first
        raise _too_large(limits)
    return body


async def read_json(request: web.Request) -> Any:
    """The request body as JSON, read by ``read_body``: 400 ``invalid_json`` when it is
    not JSON or nests deeper than the parser recurses (a RecursionError otherwise)."""
    body = await read_body(request)
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as e:
        reason = "nested too deeply" if isinstance(e, RecursionError) else str(e)[:200]
        raise ApiError.bad_request(
            f"the body is not valid JSON: {reason}", "invalid_json"
        ) from None


def _too_large(limits: ServerLimits) -> ApiError:
    return ApiError(
        413,
        f"the request body is larger than {limits.max_body_bytes} bytes",
        "invalid_request_error",
        "request_entity_too_large",
    )


def add_limit_arguments(parser: argparse.ArgumentParser) -> None:
    """``--idle-timeout``, ``--body-timeout``, ``--max-body-bytes``, ``--max-header-bytes``."""
    default = ServerLimits()
    group = parser.add_argument_group("HTTP limits")
    group.add_argument(
        "--idle-timeout", type=float, default=default.idle_timeout_s, metavar="S",
        help="close a connection with no complete request head after S seconds "
        "(default %(default)s)",
    )  # fmt: skip
    group.add_argument(
        "--body-timeout", type=float, default=default.body_timeout_s, metavar="S",
        help="answer 408 to a request body not received within S seconds (default %(default)s)",
    )  # fmt: skip
    group.add_argument(
        "--max-body-bytes", type=int, default=default.max_body_bytes, metavar="N",
        help="answer 413 to a request body over N bytes (default %(default)s)",
    )  # fmt: skip
    group.add_argument(
        "--max-header-bytes", type=int, default=default.max_field_size, metavar="N",
        help="answer 4xx to a request line or header over N bytes (default %(default)s)",
    )  # fmt: skip


def limits_from_args(args: argparse.Namespace) -> ServerLimits:
    limits = ServerLimits(
        idle_timeout_s=args.idle_timeout,
        body_timeout_s=args.body_timeout,
        max_body_bytes=args.max_body_bytes,
        max_line_size=args.max_header_bytes,
        max_field_size=args.max_header_bytes,
    )
    for f in fields(limits):
        if getattr(limits, f.name) <= 0:
            raise ValueError(f"{f.name} must be positive")
    return limits


class _ServerLog(logging.LoggerAdapter):
    """aiohttp's server logger: a malformed or oversized request head is the client's
    fault, so one WARNING line names it; anything else keeps its traceback."""

    def exception(self, msg: object, *args: object, exc_info: Any = True, **kw: Any) -> None:
        exc = exc_info if isinstance(exc_info, BaseException) else sys.exc_info()[1]
        if isinstance(exc, HttpProcessingError):
            text = str(msg) % args if args else str(msg)
            self.warning("%s: %d %s", text, exc.code, (exc.message or "")[:200])
            return
        super().exception(msg, *args, exc_info=exc_info, **kw)
