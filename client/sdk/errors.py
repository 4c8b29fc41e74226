"""Typed SDK errors: each is a ``protocol.errors.ApiError``, with the HTTP status and the
OpenAI-style error JSON that the gateway (or any other caller) should surface."""

from __future__ import annotations

from typing import Any, Self

import aiohttp

from protocol.errors import ApiError, read_error

__all__ = [
    "AttestationRejected",
    "ImagoError",
    "InvalidRequest",
    "MatcherError",
    "ReceiptRejected",
    "RelayFailed",
    "ResponseTampered",
    "UpstreamError",
    "matcher_error",
]


class ImagoError(ApiError):
    """Base of every SDK error: an ``ApiError`` (``status``, ``body``: OpenAI error JSON)
    whose status and type default per subclass. ``error_type`` is its ``type``."""

    status: int = 502
    error_type: str = "imago_error"
    code: str | int | None = None

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        error_type: str | None = None,
        code: str | int | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(
            self.status if status is None else status,
            message,
            error_type or self.error_type,
            self.code if code is None else code,
            param=param,
        )
        self.error_type = self.type

    @classmethod
    def from_error_json(cls, status: int, data: Any, default_message: str) -> Self:
        """Build from an OpenAI-style ``{"error": {...}}`` (or a flat one) and a status
        (protocol.errors.read_error reads it)."""
        return cls.from_api_error(read_error(status, data, default_message))

    @classmethod
    def from_api_error(cls, error: ApiError) -> Self:
        return cls(
            error.message,
            status=error.status,
            error_type=error.type,
            code=error.code,
            param=error.param,
        )


class InvalidRequest(ImagoError):
    """The caller's request is malformed (400)."""

    status = 400
    error_type = "invalid_request_error"


class MatcherError(ImagoError):
    """The matcher refused the route or relay: unknown model 404, price cap 402, 503…"""


class UpstreamError(ImagoError):
    """An error the node or its engine returned (sealed ERROR frame); status passes through."""


class RelayFailed(ImagoError):
    """The matcher could not complete the relay (RELAY_ERROR frame, or the stream broke)."""


class AttestationRejected(ImagoError):
    """No candidate node had an attestation this client accepts."""

    status = 502
    error_type = "attestation_error"
    code = "attestation_rejected"


class ResponseTampered(ImagoError):
    """A response frame did not open or parse: tampered, reordered, replayed or spliced."""

    status = 502
    error_type = "integrity_error"
    code = "response_tampered"


class ReceiptRejected(ImagoError):
    """The node's receipt failed a check; nothing was signed for it."""

    status = 502
    error_type = "integrity_error"
    code = "receipt_rejected"


async def matcher_error(resp: aiohttp.ClientResponse, what: str) -> MatcherError:
    """The matcher's error answer to ``what`` (its ``ErrorResponse``, or its status)."""
    try:
        data = await resp.json(content_type=None)
    except (ValueError, aiohttp.ClientError):
        data = None
    return MatcherError.from_error_json(resp.status, data, f"{what}: HTTP {resp.status}")
