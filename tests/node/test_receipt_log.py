"""The node's receipt log: every receipt it signs, one JSON line, before the receipt leaves."""

from __future__ import annotations

import base64
import json
import os
import stat

from node.app import STATE
from node.receipt_log import FILE_NAME, ReceiptLog, read_receipt_log
from protocol.signed import DEVNET_GLOBAL_ID, Receipt
from tests.node.conftest import ESCROW

MODEL = "fixture-model"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


async def test_every_signed_receipt_is_logged_before_it_leaves(node):
    results = [
        await node.job({"model": MODEL, "messages": MESSAGES}),
        await node.job({"model": MODEL, "messages": MESSAGES, "stream": True}),
    ]
    path = node.app[STATE].config.state_dir / FILE_NAME
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    lines = path.read_bytes().splitlines()
    assert len(lines) == 2
    logged = list(read_receipt_log(path))
    for r, entry, line in zip(results, logged, lines, strict=True):
        assert r.status == 200 and r.receipt is not None
        doc = json.loads(line)
        assert set(doc) == {"job_id", "time", "receipt", "signature"}
        assert doc["receipt"] == r.end["receipt"] and doc["signature"] == r.end["signature"]
        assert entry.job_id == r.job_id and entry.receipt == r.receipt
        assert entry.time == r.receipt.time
        assert entry.receipt.verify(
            entry.signature, node.keys.ed25519_public, global_id=DEVNET_GLOBAL_ID
        )
        assert entry.receipt_hash == r.receipt.hash


async def test_a_job_that_served_nothing_logs_nothing(node):
    r = await node.job({"model": "no-such-model", "messages": MESSAGES})
    assert r.status == 404
    assert list(read_receipt_log(node.app[STATE].config.state_dir / FILE_NAME)) == []


def _receipt(job: int) -> Receipt:
    from pytoniq_core import Address

    return Receipt(
        DEVNET_GLOBAL_ID,
        Address(ESCROW),
        job,
        1_700_000_000,
        1,
        10,
        20,
        100,
        200,
        5,
        b"\1" * 32,
        b"\2" * 32,
    )


def test_torn_and_malformed_lines_are_skipped(tmp_path):
    path = tmp_path / FILE_NAME
    log = ReceiptLog(path)
    for job in (1, 2):
        boc, _ = _receipt(job).encode()
        log.append(
            job.to_bytes(32, "big"), 1_700_000_000, base64.b64encode(boc).decode(), "00" * 64
        )
    log.close()
    with path.open("ab") as f:
        f.write(b'{"job_id":"00","time":1,"receipt":"not a boc"}\n{"job_id":"ab')  # torn tail
    assert [e.receipt.job_id for e in read_receipt_log(path)] == [1, 2]
    # Opened again, the log ends the torn line first: what it appends next reads.
    log = ReceiptLog(path)
    boc, _ = _receipt(3).encode()
    log.append((3).to_bytes(32, "big"), 1_700_000_000, base64.b64encode(boc).decode(), "00" * 64)
    boc, _ = _receipt(4).encode()
    log.append((4).to_bytes(32, "big"), 1_700_000_000, base64.b64encode(boc).decode(), "00" * 64)
    log.close()
    assert [e.receipt.job_id for e in read_receipt_log(path)] == [1, 2, 3, 4]


def test_a_closed_or_failing_log_never_raises(tmp_path):
    log = ReceiptLog(tmp_path / FILE_NAME)
    log.close()
    log.append(b"\0" * 32, 1, "AAAA", "00")  # logged as an error, not raised
    assert log.appended == 0
