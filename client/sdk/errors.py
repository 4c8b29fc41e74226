"""Typed SDK errors: each carries the HTTP status and the OpenAI-style error JSON that
the gateway (or any other caller) should surface."""

from __future__ import annotations

from typing import Any

__all__ = [
    "AttestationRejected",
    "ImagoError",
    "InvalidRequest",
    "MatcherError",
    "ReceiptRejected",
    "RelayFailed",
    "ResponseTampered",
    "UpstreamError",
]


class ImagoError(Exception):
    """Base of every SDK error. ``status`` is an HTTP status; ``body`` is OpenAI error JSON."""

    status: int = 502
    error_type: str = "imago_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        error_type: str | None = None,
        code: str | int | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if error_type is not None:
            self.error_type = error_type
        if code is not None:
            self.code = code  # type: ignore[assignment]
        self.param = param

    @property
    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }

    @classmethod
    def from_error_json(cls, status: int, data: Any, default_message: str) -> ImagoError:
        """Build from an OpenAI-style ``{"error": {...}}`` (or a flat one) and a status."""
        error = data.get("error", data) if isinstance(data, dict) else {}
        if not isinstance(error, dict):
            error = {"message": str(error)}
        return cls(
            str(error.get("message") or default_message),
            status=status,
            error_type=str(error.get("type") or _type_for(status)),
            code=error.get("code"),
            param=error.get("param"),
        )


def _type_for(status: int) -> str:
    if status == 404:
        return "not_found_error"
    if status == 401:
        return "authentication_error"
    if status < 500:
        return "invalid_request_error"
    return "server_error"


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
