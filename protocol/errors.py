"""One error model for every HTTP surface (matcher, node, gateway) and its readers.

An error answers with a 4xx/5xx status and an OpenAI-style body, ``api.ErrorResponse``:
``{"error": {"message", "type", "param", "code"}}``. Handlers raise ``ApiError``; the
middleware from ``error_middleware()`` turns it, aiohttp's own HTTP errors (404, 405,
413, ...) and any unexpected exception (a 500 whose body names nothing of it, logged
once) into that body. ``read_error`` is the way back: a body (or a flat
``{"status", "message", "type", "code"}`` as in a RELAY_ERROR frame) into an
``ApiError``, which a client maps onto its own exception types.

aiohttp's server side is imported only where a middleware is made: a client that just
reads errors does not load it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from protocol.api import ErrorBody, ErrorResponse

if TYPE_CHECKING:
    from aiohttp import web

__all__ = [
    "ApiError",
    "default_type",
    "error_body",
    "error_middleware",
    "read_error",
]

_log = logging.getLogger("imago.errors")

Handler = Callable[["web.Request"], Awaitable["web.StreamResponse"]]

_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
}


def default_type(status: int) -> str:
    """The OpenAI error type for a status when nothing more precise is known."""
    return _TYPES.get(status) or ("invalid_request_error" if status < 500 else "server_error")


def error_body(
    message: str, type: str, code: str | int | None = None, param: str | None = None
) -> dict[str, Any]:
    """The JSON of an ``api.ErrorResponse``."""
    return ErrorResponse(
        error=ErrorBody(message=message, type=type, param=param, code=code)
    ).model_dump()


class ApiError(Exception):
    """An error with its HTTP status, OpenAI error type and code (and param, headers).

    ``type`` defaults to ``"invalid_request_error"`` below 500 and ``"server_error"``
    from 500 on, as OpenAI types most refusals; name another where it says more
    (``"permission_error"``, ``"rate_limit_error"``...).
    """

    def __init__(
        self,
        status: int,
        message: str,
        type: str | None = None,
        code: str | int | None = None,
        *,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.code = code
        self.param = param
        self.headers = dict(headers) if headers else None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.status}, {self.message!r}, code={self.code!r})"

    @property
    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.code, self.param)

    # -- the common kinds ----------------------------------------------------------------

    @classmethod
    def bad_request(
        cls, message: str, code: str | None = None, *, param: str | None = None
    ) -> ApiError:
        return cls(400, message, "invalid_request_error", code, param=param)

    @classmethod
    def forbidden(cls, message: str, code: str, *, param: str | None = None) -> ApiError:
        return cls(403, message, "permission_error", code, param=param)

    @classmethod
    def unavailable(cls, message: str, code: str | None = None) -> ApiError:
        return cls(503, message, "service_unavailable", code)

    @classmethod
    def invalid_body(cls, e: ValidationError) -> ApiError:
        """A request body that does not validate: 400 ``invalid_body``, at its first error."""
        errors = e.errors()
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ())) or None
        message = f"invalid request body: {first.get('msg', 'malformed')}"
        return cls.bad_request(
            message + (f" at {where}" if where else ""), "invalid_body", param=where
        )


def read_error(status: int, data: Any, default_message: str) -> ApiError:
    """An ``ApiError`` from an error body another party sent with ``status``:
    ``{"error": {...}}``, a flat ``{"message", "type", "code"}``, or anything else
    (then ``default_message`` and the status's type)."""
    error = data.get("error", data) if isinstance(data, dict) else {}
    if not isinstance(error, dict):
        error = {"message": str(error)}
    code = error.get("code")
    param = error.get("param")
    return ApiError(
        status,
        str(error.get("message") or default_message),
        str(error.get("type") or default_type(status)),
        code if isinstance(code, str | int) and not isinstance(code, bool) else None,
        param=param if isinstance(param, str) else None,
    )


def _http_error(e: web.HTTPException) -> ApiError:
    """aiohttp's own 4xx/5xx (no route, method not allowed, body too large...)."""
    from aiohttp import hdrs

    default_text = f"{e.status}: {e.reason}"
    message = e.text if e.text and e.text != default_text else e.reason
    headers = {
        k: v for k, v in e.headers.items() if k not in (hdrs.CONTENT_TYPE, hdrs.CONTENT_LENGTH)
    }
    code = re.sub(r"[^a-z0-9]+", "_", e.reason.lower()).strip("_") or str(e.status)
    return ApiError(e.status, message, default_type(e.status), code, headers=headers)


def error_middleware(
    log: logging.Logger | None = None,
) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    """The aiohttp middleware that answers every error as an ``api.ErrorResponse``.

    ``ApiError`` becomes its status, headers and body; an aiohttp ``HTTPException`` of
    4xx/5xx the same way (its reason as the code: ``not_found``, ``method_not_allowed``,
    ``request_entity_too_large``...); any other exception a 500 ``internal_error`` whose
    body names nothing of it, logged once (with its traceback) to ``log``. An error
    raised once a streamed answer has begun cannot be answered: it propagates, and
    aiohttp closes the connection."""
    from aiohttp import web

    logger = log or _log

    @web.middleware
    async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except Exception as e:
            if request.writer.output_size > 0:
                raise  # the status line is out; only closing the connection says "failed"
            if isinstance(e, ApiError):
                error = e
            elif isinstance(e, web.HTTPException):
                if e.status < 400:
                    raise
                error = _http_error(e)
            else:
                logger.exception("unhandled error in %s %s", request.method, request.path)
                error = ApiError(500, "internal error", "server_error", "internal_error")
            return web.json_response(error.body, status=error.status, headers=error.headers)

    return errors
