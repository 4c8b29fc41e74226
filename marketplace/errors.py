"""The one place where exceptions become OpenAI-style ``ErrorResponse`` JSON."""

from __future__ import annotations

import json
import logging

from aiohttp import web
from pydantic import ValidationError

from protocol.api import error_json

__all__ = ["ApiError", "error_middleware", "error_response"]

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error with its HTTP status and OpenAI error type and code."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param


def error_response(
    status: int, message: str, type: str, code: str | None = None, param: str | None = None
) -> web.Response:
    return web.json_response(error_json(message, type, code, param), status=status)


def _validation_message(e: ValidationError) -> tuple[str, str | None]:
    first = e.errors()[0] if e.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ())) or None
    return f"invalid request body: {first.get('msg', 'malformed')}" + (
        f" at {where}" if where else ""
    ), where


@web.middleware
async def error_middleware(request: web.Request, handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as e:
        return error_response(e.status, e.message, e.type, e.code, e.param)
    except ValidationError as e:
        message, param = _validation_message(e)
        return error_response(400, message, "invalid_request_error", "invalid_body", param)
    except json.JSONDecodeError:
        return error_response(400, "the body is not JSON", "invalid_request_error", "invalid_json")
    except web.HTTPException as e:
        if e.status < 400:
            raise
        kind = "invalid_request_error" if e.status < 500 else "server_error"
        return error_response(e.status, e.reason, kind, str(e.status))
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return error_response(500, "internal error", "server_error", "internal_error")
