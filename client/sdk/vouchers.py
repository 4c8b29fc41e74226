"""Spend vouchers: what the client agreed to pay, signed and handed to the matcher.

Each spend is journaled in the local ``SpendLedger`` at once; a background task then
makes the cumulative spend durable, signs one ``SpendVoucher`` for it with the escrow's
spend key and posts it to ``/v1/vouchers``, at most once per ``interval`` (the jobs in
between share one voucher), retrying with backoff while the matcher does not take it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

import aiohttp
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pytoniq_core import Address

from client.sdk.ledger import SpendLedger
from protocol.errors import read_error
from protocol.signed import SpendVoucher

__all__ = ["VOUCHER_BACKOFF_MAX", "Vouchers"]

log = logging.getLogger("imago.client")

VOUCHER_BACKOFF_MAX = 10.0


class Vouchers:
    """The spend ledger at ``state_path`` and the task that posts its vouchers to the
    matcher at ``matcher_url`` (through ``session()``, the client's session)."""

    def __init__(
        self,
        *,
        global_id: int,
        matcher_url: str,
        escrow: Address,
        vault: Address,
        spend_key: Ed25519PrivateKey,
        state_path: Path,
        session: Callable[[], aiohttp.ClientSession],
        interval: float,
    ) -> None:
        self.global_id = global_id
        self.matcher_url = matcher_url
        self.escrow = escrow
        self.vault = vault
        self.escrow_str = escrow.to_str(is_user_friendly=False)
        self.vault_str = vault.to_str(is_user_friendly=False)
        self._spend_key = spend_key
        self.spend_public = spend_key.public_key().public_bytes_raw()
        self._session = session
        self.interval = interval
        self.ledger = SpendLedger.open(Path(state_path), self.escrow_str, self.vault_str)
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self.last_error: str | None = None
        self._flushing = False

    def start(self) -> None:
        if not self.ledger.is_open:  # restarted after close()
            self.ledger = SpendLedger.open(self.ledger.path, self.escrow_str, self.vault_str)
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="imago-vouchers")
            if self.ledger.cumulative > self.ledger.posted or self.ledger.pending_jobs:
                self._wake()  # left over from a previous run

    async def close(self, flush_timeout: float) -> None:
        """Try to hand outstanding vouchers to the matcher, then stop."""
        if self._task is not None:
            with contextlib.suppress(TimeoutError):
                await self.flush(flush_timeout)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.ledger.save()
        self.ledger.close()

    def spend(self, amount: int, job_id: str) -> None:
        self.ledger.add(amount, job_id)  # journaled now; snapshotted before any voucher
        self._wake()

    async def flush(self, timeout: float) -> None:
        """Wait until the matcher holds a voucher for the whole cumulative spend."""
        self._flushing = True
        try:
            async with asyncio.timeout(timeout):
                while self.ledger.cumulative > self.ledger.posted or self.ledger.pending_jobs:
                    self._idle.clear()
                    self._wake()
                    await self._idle.wait()
                    if self.last_error is not None:
                        await asyncio.sleep(0.05)
        finally:
            self._flushing = False

    def _wake(self) -> None:
        self._idle.clear()
        self._wakeup.set()

    async def _loop(self) -> None:
        backoff = 0.1
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            ledger = self.ledger
            while ledger.cumulative > ledger.posted or ledger.pending_jobs:
                snapshot = ledger.snapshot()
                # durable (fsync) before any voucher for this cumulative exists
                await asyncio.to_thread(ledger.save, snapshot)
                cumulative, jobs = snapshot["cumulative"], snapshot["pending_jobs"]
                if await self.post(cumulative, jobs):
                    ledger.acknowledge(cumulative, jobs)
                    backoff = 0.1
                    self.last_error = None
                    if self.interval > 0 and not self._flushing:
                        await asyncio.sleep(self.interval)  # let spends coalesce
                else:
                    self._idle.set()
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, VOUCHER_BACKOFF_MAX)
            self._idle.set()

    async def post(self, cumulative: int, jobs: list[list]) -> bool:
        """Sign and post the voucher for ``cumulative``; whether the matcher holds it."""
        voucher = SpendVoucher(
            global_id=self.global_id, escrow=self.escrow, vault=self.vault, cumulative=cumulative
        )
        submission = {
            "voucher": base64.b64encode(voucher.to_boc()).decode(),
            "signature": voucher.sign(self._spend_key).hex(),
            "spend_public": self.spend_public.hex(),
            "jobs": [{"job_id": job, "amount": amount} for job, amount in jobs],
        }
        try:
            async with self._session().post(
                f"{self.matcher_url}/v1/vouchers", json=submission
            ) as resp:
                if resp.status == 200:
                    return True
                if resp.status == 409 and await _already_holds(resp):
                    # An earlier post reached the matcher but its answer was lost: the
                    # matcher holds a voucher of ours at or above this cumulative.
                    return True
                self.last_error = f"HTTP {resp.status}: {(await resp.text())[:300]}"
        except (aiohttp.ClientError, TimeoutError) as e:
            self.last_error = f"matcher unreachable: {e}"
        log.warning("voucher for %d not accepted yet: %s", cumulative, self.last_error)
        return False


async def _already_holds(resp: aiohttp.ClientResponse) -> bool:
    try:
        data = await resp.json(content_type=None)
    except (ValueError, aiohttp.ClientError):
        return False
    return read_error(resp.status, data, "").code in ("voucher_not_increasing", "voucher_conflict")
