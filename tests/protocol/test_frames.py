"""protocol.frames: the stream rules the matcher's relay and the client share, one by one."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from protocol.envelope import (
    MAX_FRAME_BYTES,
    FrameType,
    ResponseOpener,
    ResponseSealer,
    encode_frame,
    new_job_id,
)
from protocol.errors import ApiError
from protocol.frames import (
    BadEndFrame,
    FrameReader,
    StreamViolation,
    read_relay_error,
    relay_error_frame,
)

JOB_ID = new_job_id()
KEY = os.urandom(32)


def data(n: int = 1) -> list[bytes]:
    """``n`` DATA frames sealed in order, as a node writes them (fresh sealer)."""
    sealer = ResponseSealer(KEY, JOB_ID)
    return [sealer.seal(FrameType.DATA, f'{{"part": {i}}}'.encode()) for i in range(n)]


def end(receipt: str | None = "AAAA", signature: str | None = "ab" * 64, tokens=(3, 4)) -> bytes:
    payload = {
        "receipt": receipt,
        "signature": signature,
        "prompt_tokens": tokens[0],
        "completion_tokens": tokens[1],
    }
    return encode_frame(FrameType.END, json.dumps(payload).encode())


def no_receipt() -> bytes:
    return end(receipt=None, signature=None, tokens=(0, 0))


def relay_error(status: int = 502, code: str = "node_failed_midstream") -> bytes:
    return relay_error_frame(ApiError(status, "the node failed", "relay_error", code))


def violation(reader: FrameReader, *pieces: bytes) -> StreamViolation:
    with pytest.raises(StreamViolation) as info:
        for piece in pieces:
            reader.feed(piece)
        reader.close()
    return info.value


# -- a well-formed stream -------------------------------------------------------------


def test_whole_frames_are_read_and_forwarded_as_received():
    frames = data(3)
    stream = b"".join(frames)
    reader = FrameReader(relay_errors=False)
    read = reader.feed(stream)
    assert [t for t, _ in read] == [FrameType.DATA] * 3
    assert [encode_frame(t, p) for t, p in read] == frames
    assert reader.forward is stream  # a piece of whole sealed frames is forwarded as is
    assert reader.feed(end()) == [] and reader.forward == b""
    assert reader.end is not None and reader.end.completion_tokens == 4
    assert reader.end_payload == end()[5:]
    reader.close()
    assert reader.done and reader.data_frames == 3


@pytest.mark.parametrize("piece", [1, 2, 5, 7, 64])
def test_frames_split_anywhere_read_the_same(piece):
    frames = data(4)
    stream = b"".join(frames) + end()
    reader = FrameReader(relay_errors=False)
    read, forwarded = [], b""
    for i in range(0, len(stream), piece):
        read += reader.feed(stream[i : i + piece])
        forwarded += reader.forward
    reader.close()
    assert [encode_frame(t, p) for t, p in read] == frames
    assert forwarded == b"".join(frames)  # whole sealed frames only; END held back
    assert reader.end is not None


def test_a_large_frame_in_many_pieces():
    sealer = ResponseSealer(KEY, JOB_ID)
    big = sealer.seal(FrameType.DATA, os.urandom(3 * 1024 * 1024))
    reader = FrameReader(relay_errors=False)
    read = []
    for i in range(0, len(big), 1000):
        read += reader.feed(big[i : i + 1000])
        assert reader.pending == (i + len(big[i : i + 1000])) % len(big)
    assert len(read) == 1 and encode_frame(*read[0]) == big


def test_forwarded_bytes_are_the_sealed_transcript_and_open_in_order():
    sealer = ResponseSealer(KEY, JOB_ID)
    frames = [sealer.seal(FrameType.DATA, b"one"), sealer.seal(FrameType.ERROR, b"two")]
    reader = FrameReader(relay_errors=False)
    read = reader.feed(b"".join(frames) + no_receipt())
    assert hashlib.sha256(reader.forward).digest() == sealer.transcript_hash
    opener = ResponseOpener(KEY, JOB_ID)
    assert [opener.open(t, p) for t, p in read] == [b"one", b"two"]


def test_errors_follow_data_and_may_follow_each_other():
    sealer = ResponseSealer(KEY, JOB_ID)
    stream = [
        sealer.seal(FrameType.DATA, b"{}"),
        sealer.seal(FrameType.ERROR, b"{}"),
        sealer.seal(FrameType.ERROR, b"{}"),  # e.g. unbillable, then the id not on disk
        no_receipt(),
    ]
    reader = FrameReader(relay_errors=False)
    assert len(reader.feed(b"".join(stream))) == 3
    reader.close()
    assert reader.error_frames == 2


def test_nothing_served_ends_without_a_receipt():
    sealer = ResponseSealer(KEY, JOB_ID)
    reader = FrameReader(relay_errors=False)
    reader.feed(sealer.seal(FrameType.ERROR, b"{}") + no_receipt())
    reader.close()
    assert reader.end is not None and reader.end.receipt is None


# -- frames ---------------------------------------------------------------------------


def test_an_unknown_frame_type_is_refused_at_its_header():
    e = violation(FrameReader(relay_errors=False), data(1)[0] + bytes([9, 0, 0, 0, 1]))
    assert e.code == "malformed_frame" and "type 9" in str(e)
    assert len(e.frames) == 1  # the good frame before it


def test_a_frame_over_the_limit_is_refused_before_its_payload():
    header = bytes([FrameType.DATA]) + (MAX_FRAME_BYTES + 1).to_bytes(4, "big")
    assert violation(FrameReader(relay_errors=False), header).code == "malformed_frame"


# -- order ----------------------------------------------------------------------------


def test_no_frame_after_end():
    first, second = data(2)
    reader = FrameReader(relay_errors=False)
    e = violation(reader, first + end() + second)
    assert e.code == "frame_after_end"
    assert [encode_frame(*f) for f in e.frames] == [first]
    assert reader.forward == first  # the good prefix a relay still forwards


def test_no_frame_after_end_in_a_later_piece():
    reader = FrameReader(relay_errors=False)
    assert violation(reader, data(1)[0] + end(), end()).code == "frame_after_end"


def test_no_data_after_an_error():
    sealer = ResponseSealer(KEY, JOB_ID)
    stream = sealer.seal(FrameType.ERROR, b"{}") + sealer.seal(FrameType.DATA, b"{}")
    assert violation(FrameReader(relay_errors=False), stream).code == "data_after_error"


def test_a_node_never_sends_relay_error():
    reader = FrameReader(relay_errors=False)
    assert violation(reader, data(1)[0] + relay_error()).code == "unexpected_relay_error"


def test_relay_error_ends_the_stream_for_the_client():
    reader = FrameReader(relay_errors=True)
    read = reader.feed(data(1)[0] + relay_error(429, "nodes_busy"))
    reader.close()
    assert len(read) == 1 and reader.end is None
    error = reader.relay_error
    assert (error.status, error.type, error.code) == (429, "relay_error", "nodes_busy")
    assert violation(FrameReader(relay_errors=True), relay_error() + end()).code == (
        "frame_after_end"
    )


def test_an_unreadable_relay_error_is_a_502():
    error = read_relay_error(b"not json")
    assert error.status == 502 and "unreadable" in error.message
    odd = read_relay_error(json.dumps({"status": 200, "message": "?"}).encode())
    assert odd.status == 502 and odd.message == "?"


# -- the END frame --------------------------------------------------------------------


def test_end_must_be_an_end_frame():
    garbage = encode_frame(FrameType.END, b'{"receipt": 3}')
    e = violation(FrameReader(relay_errors=False), data(1)[0] + garbage)
    assert isinstance(e, BadEndFrame) and e.code == "malformed_end"


def test_a_receipt_is_signed():
    e = violation(FrameReader(relay_errors=False), data(1)[0] + end(signature=None))
    assert isinstance(e, BadEndFrame) and e.code == "unsigned_receipt"


def test_a_receipt_follows_a_data_frame():
    sealer = ResponseSealer(KEY, JOB_ID)
    for stream in (end(), sealer.seal(FrameType.ERROR, b"{}") + end()):
        e = violation(FrameReader(relay_errors=False), stream)
        assert isinstance(e, BadEndFrame) and e.code == "receipt_without_data"


def test_no_receipt_means_no_tokens():
    stream = data(1)[0] + end(receipt=None, signature=None, tokens=(3, 0))
    e = violation(FrameReader(relay_errors=False), stream)
    assert isinstance(e, BadEndFrame) and e.code == "tokens_without_receipt"


# -- how the stream closes ------------------------------------------------------------


def test_closing_without_end_or_inside_a_frame():
    assert violation(FrameReader(relay_errors=True), *data(2)).code == "no_end_frame"
    assert violation(FrameReader(relay_errors=True)).code == "no_end_frame"
    cut = data(1)[0]
    assert violation(FrameReader(relay_errors=False), cut[:-1]).code == "truncated_frame"
    assert violation(FrameReader(relay_errors=False), cut[:3]).code == "truncated_frame"


def test_bytes_after_the_end_are_refused_at_close():
    stream = data(1)[0] + end() + b"\x01\x00"
    assert violation(FrameReader(relay_errors=False), stream).code == "frame_after_end"
