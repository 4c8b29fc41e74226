"""Reading a response frame stream where it arrives: the matcher's relay and the client.

A node writes ``DATA* ERROR* END`` (protocol.envelope has the frame format); the
matcher forwards it, or ends it early with its own RELAY_ERROR instead of END.
``FrameReader`` checks the rules of that stream, the same for both readers:

- each frame parses: a known type, at most ``MAX_FRAME_BYTES``;
- the sealed frames (DATA, ERROR) come first, and no DATA follows an ERROR;
- END ends the stream: nothing follows it; its payload is an ``api.EndFrame``, whose
  receipt is signed and follows a DATA frame, or is null with no tokens;
- RELAY_ERROR comes only from the matcher (a reader of a node's stream refuses it) and
  ends the stream too;
- the stream closes after its end, neither before it nor inside a frame (``close``).

It does not open sealed frames (only the client holds the key, and its
``ResponseOpener`` checks their sequence) nor verify the receipt (protocol.receipts).

``feed`` costs one pass over the header of each frame: its ``forward`` is the raw bytes
of the complete sealed frames of that piece, the very bytes received when the piece
holds whole frames, which a relay forwards and hashes as they are.
"""

from __future__ import annotations

import json

from pydantic import ValidationError

from protocol.api import EndFrame
from protocol.envelope import (
    FRAME_HEADER,
    MAX_FRAME_BYTES,
    EnvelopeError,
    FrameType,
    encode_frame,
)
from protocol.errors import ApiError, read_error

__all__ = [
    "BadEndFrame",
    "Frame",
    "FrameReader",
    "StreamViolation",
    "read_relay_error",
    "relay_error_frame",
]

Frame = tuple[FrameType, bytes]  # a sealed frame: its type (DATA or ERROR) and ciphertext

_HEADER_SIZE = FRAME_HEADER.size
_unpack_header = FRAME_HEADER.unpack_from
_DATA, _ERROR, _END, _RELAY_ERROR = (int(t) for t in FrameType)


class StreamViolation(EnvelopeError):
    """The stream broke a rule. ``code`` names it; ``frames`` are the sealed frames the
    same ``feed`` had read before it (they were good)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.frames: list[Frame] = []


class BadEndFrame(StreamViolation):
    """The END frame is unreadable or breaks the receipt rules (a receipt without a
    signature or without a DATA frame before it, tokens without a receipt)."""


class FrameReader:
    """The rules of one response stream, checked on its bytes in the order they arrive.

    ``relay_errors``: whether RELAY_ERROR may end the stream (the client's reading of
    what the matcher relays), or is a violation (the matcher's reading of a node).
    After the stream's end, ``end`` is its END frame or ``relay_error`` its RELAY_ERROR.
    """

    def __init__(self, *, relay_errors: bool) -> None:
        self._relay_errors = relay_errors
        self._parts: list[bytes] = []  # the start of a frame not complete yet
        self._have = 0  # bytes in _parts
        self._need = 0  # bytes that frame needs (the header's size until it is read)
        self.end: EndFrame | None = None
        self.end_payload: bytes | None = None  # the END frame's payload, as received
        self.relay_error: ApiError | None = None
        self.data_frames = 0
        self.error_frames = 0
        self.forward = b""  # raw bytes of the sealed frames the last feed completed

    @property
    def done(self) -> bool:
        """Whether END or RELAY_ERROR arrived: nothing may follow."""
        return self.end is not None or self.relay_error is not None

    @property
    def pending(self) -> int:
        """Bytes of a frame not complete yet."""
        return self._have

    def feed(self, data: bytes) -> list[Frame]:
        """The sealed frames ``data`` completes, in order; END and RELAY_ERROR are taken
        in (``end``, ``relay_error``). Raises StreamViolation at the first broken rule."""
        if self._parts:
            self._parts.append(data)
            self._have += len(data)
            if self._have < self._need:
                self.forward = b""
                return []
            data = b"".join(self._parts)
            self._parts.clear()
            self._have = 0
        frames: list[Frame] = []
        size = len(data)
        pos = sealed_end = 0
        try:
            while size - pos >= _HEADER_SIZE:
                type_byte, length = _unpack_header(data, pos)
                if not _DATA <= type_byte <= _RELAY_ERROR:
                    raise StreamViolation("malformed_frame", f"unknown frame type {type_byte}")
                if length > MAX_FRAME_BYTES:
                    raise StreamViolation(
                        "malformed_frame", f"frame of {length} bytes exceeds the limit"
                    )
                if self.done:
                    raise StreamViolation(
                        "frame_after_end", f"a {FrameType(type_byte).name} frame after the end"
                    )
                start = pos + _HEADER_SIZE
                end = start + length
                if end > size:
                    break
                if type_byte == _DATA:
                    if self.error_frames:
                        raise StreamViolation("data_after_error", "a DATA frame after an ERROR")
                    self.data_frames += 1
                    frames.append((FrameType.DATA, data[start:end]))
                    sealed_end = end
                elif type_byte == _ERROR:
                    self.error_frames += 1
                    frames.append((FrameType.ERROR, data[start:end]))
                    sealed_end = end
                elif type_byte == _END:
                    self.end_payload = data[start:end]
                    self.end = self._end_frame(self.end_payload)
                elif self._relay_errors:
                    self.relay_error = read_relay_error(data[start:end])
                else:
                    raise StreamViolation(
                        "unexpected_relay_error", "a RELAY_ERROR frame from a node"
                    )
                pos = end
        except StreamViolation as e:
            e.frames = frames
            self.forward = data[:sealed_end]
            raise
        self.forward = data if sealed_end == size else data[:sealed_end]
        if pos < size:
            rest = data[pos:] if pos else data
            self._parts.append(rest)
            self._have = len(rest)
            self._need = (
                _HEADER_SIZE + _unpack_header(rest)[1]
                if len(rest) >= _HEADER_SIZE
                else _HEADER_SIZE
            )
        return frames

    def close(self) -> None:
        """The stream closed: raise StreamViolation unless it closed after its end (its
        message says what the stream did: "closed inside a frame"...)."""
        if self._have:
            if self.done:
                raise StreamViolation("frame_after_end", "has bytes after its end")
            raise StreamViolation("truncated_frame", "closed inside a frame")
        if not self.done:
            raise StreamViolation("no_end_frame", "closed without its END frame")

    def _end_frame(self, payload: bytes) -> EndFrame:
        try:
            end = EndFrame.model_validate_json(payload)
        except ValidationError as e:
            raise BadEndFrame("malformed_end", f"malformed END frame: {e}") from None
        if end.receipt is None:
            if end.prompt_tokens or end.completion_tokens:
                raise BadEndFrame(
                    "tokens_without_receipt",
                    "tokens were served but the END frame carries no receipt",
                )
        elif end.signature is None:
            raise BadEndFrame("unsigned_receipt", "the receipt is not signed")
        elif not self.data_frames:
            raise BadEndFrame("receipt_without_data", "a receipt for a job that delivered nothing")
        return end


def relay_error_frame(error: ApiError) -> bytes:
    """The matcher's clear RELAY_ERROR frame: ``{"status", "message", "type", "code"}``."""
    payload = {
        "status": error.status,
        "message": error.message,
        "type": error.type,
        "code": error.code,
    }
    return encode_frame(FrameType.RELAY_ERROR, json.dumps(payload).encode())


def read_relay_error(payload: bytes) -> ApiError:
    """A RELAY_ERROR frame's error; an unreadable one is a 502 all the same."""
    try:
        data = json.loads(payload)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        return ApiError(502, "the relay failed (unreadable RELAY_ERROR frame)", "relay_error")
    status = data.get("status")
    if type(status) is not int or not 400 <= status <= 599:
        status = 502
    return read_error(status, data, "the relay failed")
