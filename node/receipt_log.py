"""The node's receipt log: one JSON line per receipt it signed, in its state directory.

Every receipt the node signs is appended before the END frame that carries it leaves
(``{"job_id": hex, "time": unix, "receipt": base64 BOC, "signature": hex}``), with one
``write(2)`` on an ``O_APPEND`` descriptor: once the client can hold a receipt, the
line is in the kernel, so a crash of the node (kill -9 included) cannot lose it.
Against a power cut, a background ``fdatasync`` (one at a time, off the event loop,
never awaited by a job) follows the appends; a power cut can lose the lines of the
last few milliseconds, never a job id (``jobs.seen`` is synced before the receipt is
signed), and the matcher's records still name those jobs.

``imago provider earnings`` reads it to cross-check the matcher's per-job records and
to count what is not yet in a committed epoch; an auditor can check it against the
published ledger (each record's ``receipt_hash`` is the hash of a receipt cell here).

A torn last line (a crash in the middle of a write) is skipped when read, and ended
when the log is opened again.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from protocol.signed import Receipt, SignedObjectError

__all__ = ["LoggedReceipt", "ReceiptLog", "read_receipt_log"]

log = logging.getLogger("imago.node.receipts")

FILE_NAME = "receipts.jsonl"


class ReceiptLog:
    """Append-only; ``append`` is one ``write(2)``, cheap enough for the hot path."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        size = os.fstat(self._fd).st_size
        if size and os.pread(self._fd, 1, size - 1) != b"\n":
            os.write(self._fd, b"\n")  # end a line torn by a crash: the next one reads
        self._dirty = False
        self._syncing = False
        self.appended = 0

    def append(self, job_id: bytes, time: int, receipt_b64: str, signature_hex: str) -> None:
        """Log one signed receipt (its BOC in base64 as sent in the END frame). Never
        raises: a log that cannot be written must not keep a receipt from its client
        (the job id is on disk; the matcher's records still hold the job)."""
        line = (
            f'{{"job_id":"{job_id.hex()}","time":{time},"receipt":"{receipt_b64}",'
            f'"signature":"{signature_hex}"}}\n'
        )
        try:
            if self._fd is None:
                raise OSError("the receipt log is closed")
            os.write(self._fd, line.encode())
        except OSError as e:
            log.error("job %s: receipt not logged in %s: %s", job_id.hex()[:16], self.path, e)
            return
        self.appended += 1
        self._dirty = True
        if not self._syncing:
            self._start_sync()

    def _start_sync(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a script, a test): nothing to schedule
            return
        self._syncing, self._dirty = True, False
        loop.run_in_executor(None, self._fdatasync, self._fd).add_done_callback(self._synced)

    @staticmethod
    def _fdatasync(fd: int | None) -> None:
        if fd is not None:
            with contextlib.suppress(OSError):  # closed meanwhile: close() synced it
                os.fdatasync(fd)

    def _synced(self, _future: asyncio.Future[None]) -> None:
        self._syncing = False
        if self._dirty and self._fd is not None:
            self._start_sync()

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                os.fdatasync(fd)
            os.close(fd)


@dataclass(frozen=True)
class LoggedReceipt:
    job_id: bytes
    time: int
    receipt: Receipt
    receipt_hash: bytes  # the hash of the cell as logged: what the signature covers
    signature: bytes


def read_receipt_log(path: Path) -> Iterator[LoggedReceipt]:
    """The receipts logged at ``path`` (none if it does not exist), skipping torn or
    malformed lines (logged at warning)."""
    try:
        f = path.open("rb")
    except FileNotFoundError:
        return
    with f:
        for number, line in enumerate(f, 1):
            try:
                doc = json.loads(line)
                receipt, cell_hash = Receipt.parse_boc(base64.b64decode(doc["receipt"]))
                entry = LoggedReceipt(
                    job_id=bytes.fromhex(doc["job_id"]),
                    time=int(doc["time"]),
                    receipt=receipt,
                    receipt_hash=cell_hash,
                    signature=bytes.fromhex(doc["signature"]),
                )
            except (ValueError, KeyError, TypeError, SignedObjectError) as e:
                log.warning("%s:%d: skipping a malformed line (%s)", path, number, e)
                continue
            yield entry
