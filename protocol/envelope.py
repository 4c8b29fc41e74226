"""The confidential envelope between a client and an attested node.

Request: HPKE base mode (RFC 9180; X25519, HKDF-SHA256, ChaCha20-Poly1305) to the
node's X25519 key, with ``info`` bound to the job id, so a sealed request cannot be
replayed under another job id. The plaintext carries a fresh 32-byte response key.

Response: a stream of frames ``type:uint8 length:uint32be payload``. DATA and ERROR
payloads are ChaCha20-Poly1305 under the response key with a nonce equal to the frame's
sequence number and the job id, sequence and type as associated data: a reordered,
replayed, dropped or forged frame fails to open. END is clear (the matcher meters it)
and carries the node-signed receipt whose ``response_hash`` is the SHA-256 of every
sealed frame in order, so a truncated or spliced transcript fails the receipt check.
RELAY_ERROR is clear and comes from the matcher, which holds no key.

Job ids: 4 bytes of creation time (unix seconds, big-endian), then 28 random bytes.
Matcher and node refuse an id outside ``[now - JOB_ID_MAX_AGE_S, now +
JOB_ID_MAX_SKEW_S]``, so a node need remember the ids it served for one window only.
"""

from __future__ import annotations

import hashlib
import os
import struct
import time
from collections.abc import Iterator
from enum import IntEnum

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

__all__ = [
    "FRAMES_CONTENT_TYPE",
    "JOB_HEADER",
    "JOB_ID_MAX_AGE_S",
    "JOB_ID_MAX_SKEW_S",
    "EnvelopeError",
    "FrameDecoder",
    "FrameType",
    "JobIdRefused",
    "ResponseOpener",
    "ResponseSealer",
    "check_job_id_time",
    "encode_frame",
    "job_id_time",
    "new_job_id",
    "new_response_key",
    "open_request",
    "request_hash",
    "seal_request",
]

SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.CHACHA20_POLY1305)
REQUEST_INFO = b"imago/v1/request:"
JOB_ID_BYTES = 32
JOB_ID_MAX_AGE_S = 600  # a job may wait this long between its creation and a node
JOB_ID_MAX_SKEW_S = 60  # how far ahead of a verifier's clock a client's clock may run
RESPONSE_KEY_BYTES = 32
FRAME_HEADER = struct.Struct(">BI")
JOB_HEADER = "X-Imago-Job"  # matcher → node: the job id, hex
FRAMES_CONTENT_TYPE = "application/x-imago-frames"  # node → matcher → client
MAX_FRAME_BYTES = 16 * 1024 * 1024


class EnvelopeError(ValueError):
    """A sealed request or response frame that does not open or parse."""


class FrameType(IntEnum):
    DATA = 1  # sealed: one engine chunk (or the whole non-streaming response)
    ERROR = 2  # sealed: an OpenAI-style error from the node or its engine
    END = 3  # clear: the signed receipt, or no receipt if nothing was served
    RELAY_ERROR = 4  # clear: the matcher could not complete the relay


SEALED_TYPES = frozenset({FrameType.DATA, FrameType.ERROR})


class JobIdRefused(EnvelopeError):
    """A job id whose time is outside the window; ``code`` is the API error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def new_job_id(now: float | None = None) -> bytes:
    created = int(time.time() if now is None else now)
    return created.to_bytes(4, "big") + os.urandom(JOB_ID_BYTES - 4)


def job_id_time(job_id: bytes) -> int:
    """The creation time (unix seconds) a job id carries."""
    return int.from_bytes(job_id[:4], "big")


def check_job_id_time(job_id: bytes, now: float, *, not_before: int = 0) -> None:
    """Raise JobIdRefused unless the job id's time is acceptable at ``now``.

    ``not_before``: a node that forgot the ids below a time refuses them even if its
    clock steps back, since it could no longer tell a replay.
    """
    created = job_id_time(job_id)
    if created < now - JOB_ID_MAX_AGE_S:
        raise JobIdRefused(
            "job_id_expired",
            f"the job id was created {int(now) - created} s ago; a job id is valid for "
            f"{JOB_ID_MAX_AGE_S} s: send the job again under a new one",
        )
    if created < not_before:
        raise JobIdRefused(
            "job_id_expired",
            f"the job id was created at {created}, before {not_before}, when this node "
            "forgot the ids it served (its clock went back?): send the job again under a "
            "new one",
        )
    if created > now + JOB_ID_MAX_SKEW_S:
        raise JobIdRefused(
            "job_id_from_future",
            f"the job id was created {created - int(now)} s in the future; clocks may "
            f"differ by {JOB_ID_MAX_SKEW_S} s at most: check the client's clock",
        )


def new_response_key() -> bytes:
    return os.urandom(RESPONSE_KEY_BYTES)


def _check_job_id(job_id: bytes) -> None:
    if len(job_id) != JOB_ID_BYTES:
        raise EnvelopeError(f"a job id is {JOB_ID_BYTES} bytes, got {len(job_id)}")


def seal_request(node_x25519_public: bytes, job_id: bytes, plaintext: bytes) -> bytes:
    _check_job_id(job_id)
    public_key = X25519PublicKey.from_public_bytes(node_x25519_public)
    return SUITE.encrypt(plaintext, public_key, info=REQUEST_INFO + job_id)


def open_request(private_key: X25519PrivateKey, job_id: bytes, sealed: bytes) -> bytes:
    _check_job_id(job_id)
    try:
        return SUITE.decrypt(sealed, private_key, info=REQUEST_INFO + job_id)
    except Exception as e:  # InvalidTag, or a malformed encapsulated key
        raise EnvelopeError("sealed request does not open") from e


def request_hash(sealed: bytes) -> bytes:
    return hashlib.sha256(sealed).digest()


def encode_frame(frame_type: FrameType, payload: bytes) -> bytes:
    return FRAME_HEADER.pack(frame_type, len(payload)) + payload


class FrameDecoder:
    """Incremental frame parser for a byte stream that arrives in arbitrary pieces."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> Iterator[tuple[FrameType, bytes]]:
        self._buffer += data
        while len(self._buffer) >= FRAME_HEADER.size:
            type_byte, length = FRAME_HEADER.unpack_from(self._buffer)
            if length > MAX_FRAME_BYTES:
                raise EnvelopeError(f"frame of {length} bytes exceeds the limit")
            try:
                frame_type = FrameType(type_byte)
            except ValueError as e:
                raise EnvelopeError(f"unknown frame type {type_byte}") from e
            end = FRAME_HEADER.size + length
            if len(self._buffer) < end:
                return
            payload = bytes(self._buffer[FRAME_HEADER.size : end])
            del self._buffer[:end]
            yield frame_type, payload

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame: non-zero at end of stream means truncation."""
        return len(self._buffer)


class _ResponseCipher:
    def __init__(self, response_key: bytes, job_id: bytes) -> None:
        _check_job_id(job_id)
        if len(response_key) != RESPONSE_KEY_BYTES:
            raise EnvelopeError("a response key is 32 bytes")
        self._aead = ChaCha20Poly1305(response_key)
        self._job_id = job_id
        self._seq = 0
        self._transcript = hashlib.sha256()

    def _nonce_and_aad(self, frame_type: FrameType) -> tuple[bytes, bytes]:
        if frame_type not in SEALED_TYPES:
            raise EnvelopeError(f"{frame_type.name} frames are not sealed")
        nonce = self._seq.to_bytes(12, "big")
        return nonce, self._job_id + self._seq.to_bytes(8, "big") + bytes([frame_type])

    def _record(self, frame_type: FrameType, ciphertext: bytes) -> None:
        self._transcript.update(encode_frame(frame_type, ciphertext))
        self._seq += 1

    @property
    def transcript_hash(self) -> bytes:
        """SHA-256 over every sealed frame so far: the receipt's ``response_hash``."""
        return self._transcript.digest()

    @property
    def frames(self) -> int:
        return self._seq


class ResponseSealer(_ResponseCipher):
    """Node side: seals response frames in order."""

    def seal(self, frame_type: FrameType, plaintext: bytes) -> bytes:
        """Return the encoded frame, ready to write to the stream."""
        nonce, aad = self._nonce_and_aad(frame_type)
        ciphertext = self._aead.encrypt(nonce, plaintext, aad)
        self._record(frame_type, ciphertext)
        return encode_frame(frame_type, ciphertext)


class ResponseOpener(_ResponseCipher):
    """Client side: opens response frames, which must arrive in the order sealed."""

    def open(self, frame_type: FrameType, ciphertext: bytes) -> bytes:
        nonce, aad = self._nonce_and_aad(frame_type)
        try:
            plaintext = self._aead.decrypt(nonce, ciphertext, aad)
        except InvalidTag as e:
            raise EnvelopeError(
                f"response frame {self._seq} does not open (tampered, reordered or replayed)"
            ) from e
        self._record(frame_type, ciphertext)
        return plaintext


def generate_x25519() -> tuple[X25519PrivateKey, bytes]:
    key = X25519PrivateKey.generate()
    return key, key.public_key().public_bytes_raw()
