"""The replay memory of a node: the job ids its key accepted (``jobs.seen``).

Two different receipts for one job id signed by one node key are slashable
equivocation, so a node never serves a job id twice, across restarts (docs/protocol.md,
"Job ids").
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from protocol import envelope

__all__ = ["SeenJobs"]

_RECORD = envelope.JOB_ID_BYTES
_BUCKET_S = 60  # ids are forgotten a bucket at a time: up to this long after they expire
# An accepted id never starts with 0xffffffff (the year 2106 is refused as the future),
# so the header cannot be mistaken for an id, nor an id for it.
_HEADER_TAG = b"\xff" * 4 + b"imago/jobs.seen/v2".ljust(24, b"\x00")


class SeenJobs:
    """The job ids this node key accepted, for as long as they could come back.

    A second receipt for one job id signed by one key is slashable equivocation, so
    the set is persisted (an id is appended before its job runs) and survives
    restarts. A job id carries its creation time and is refused once older than
    ``JOB_ID_MAX_AGE_S``, so an id is forgotten after that, and memory and file hold
    about one window of jobs. Ids live in buckets by their time, so that forgetting
    drops whole buckets and a lookup needs no global set.

    ``floor`` is the time below which ids may have been forgotten: the node refuses
    them even if its clock steps back. The file is a header record (a tag and
    ``floor``) and 32-byte ids; it is rewritten (atomically, 0600, fsynced) at start
    and when forgotten ids make up half of it.

    ``add`` appends at once; ``sync`` waits until the ids added so far are on disk
    (one fdatasync for everyone waiting, off the event loop). A job's receipt leaves
    only after that, so not even a power cut can make the node forget an id it signed
    a receipt for.
    """

    def __init__(self, path: Path, now: float | None = None) -> None:
        self._path = path
        self._buckets: dict[int, set[bytes]] = {}
        self._live = 0
        self._records = 0  # ids in the file, forgotten ones included
        self._fd: int | None = None
        self._appended = 0  # ids appended since start; never reset
        self._synced = 0  # how many of those are known to be on disk
        self._syncing: asyncio.Future[None] | None = None
        self._next_prune = 0.0
        self.floor = 0
        now = time.time() if now is None else now
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            raw = path.read_bytes()
            usable = len(raw) - len(raw) % _RECORD  # a torn last write is dropped
            start = 0
            if raw[: len(_HEADER_TAG)] == _HEADER_TAG and usable >= _RECORD:
                self.floor = int.from_bytes(raw[len(_HEADER_TAG) : _RECORD], "big")
                start = _RECORD
            for i in range(start, usable, _RECORD):
                self._remember(raw[i : i + _RECORD])
        self._prune(now, compact=False)
        self._rewrite()

    def __contains__(self, job_id: bytes) -> bool:
        bucket = self._buckets.get(envelope.job_id_time(job_id) // _BUCKET_S)
        return bucket is not None and job_id in bucket

    def __len__(self) -> int:
        return self._live

    def add(self, job_id: bytes, now: float) -> None:
        if now >= self._next_prune:
            self._prune(now)
        self._remember(job_id)
        if self._fd is not None:
            os.write(self._fd, job_id)
            self._records += 1
            self._appended += 1

    async def sync(self) -> None:
        """Return once every id added so far is on disk."""
        target = self._appended
        while self._synced < target:
            if self._syncing is None:
                self._syncing = asyncio.ensure_future(self._fdatasync(self._fd, self._appended))
            await asyncio.shield(self._syncing)

    async def _fdatasync(self, fd: int | None, upto: int) -> None:
        try:
            if fd is not None:
                await asyncio.to_thread(os.fdatasync, fd)
            self._synced = max(self._synced, upto)
        finally:
            self._syncing = None

    def _remember(self, job_id: bytes) -> None:
        bucket = self._buckets.setdefault(envelope.job_id_time(job_id) // _BUCKET_S, set())
        if job_id not in bucket:
            bucket.add(job_id)
            self._live += 1

    def _prune(self, now: float, *, compact: bool = True) -> None:
        """Forget the buckets whose every id is expired at ``now``."""
        self._next_prune = now + _BUCKET_S
        first_kept = (int(now) - envelope.JOB_ID_MAX_AGE_S) // _BUCKET_S
        for index in [i for i in self._buckets if i < first_kept]:
            self._live -= len(self._buckets.pop(index))
        self.floor = max(self.floor, first_kept * _BUCKET_S)
        # Rewriting costs the whole file: only once forgotten ids are half of it, and not
        # while a thread syncs the file descriptor the rewrite would close.
        if (
            compact
            and self._fd is not None
            and self._syncing is None
            and self._records >= max(1, 2 * self._live)
        ):
            self._rewrite()

    def _rewrite(self) -> None:
        """Replace the file with the header and the ids remembered now."""
        tmp = self._path.with_name(self._path.name + ".tmp")
        tmp.unlink(missing_ok=True)
        header = _HEADER_TAG + self.floor.to_bytes(_RECORD - len(_HEADER_TAG), "big")
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
            f.write(header + b"".join(b"".join(ids) for ids in self._buckets.values()))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._path)
        if self._fd is not None:
            os.close(self._fd)
        self._fd = os.open(self._path, os.O_WRONLY | os.O_APPEND)
        self._records = self._live
        self._synced = self._appended  # every id remembered is in the fsynced file

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
