"""Waiting for transactions and traces, mixed into
:class:`~contracts.chain.toncenter.ToncenterClient`.

Polling ``getTransactions`` finds the transaction a message caused; following its
out-messages to their destinations gathers the whole :class:`~contracts.chain.transactions.Trace`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from pytoniq_core import Address, Cell

from .results import AddressInfo, SentMessage, _addr
from .transactions import Message, Trace, Transaction

__all__ = ["TransactionWaiting"]


class TransactionWaiting:
    """The waits of :class:`~contracts.chain.toncenter.ToncenterClient`, built on its
    ``get_transactions``, ``get_address_information`` and ``send_boc_return_hash``."""

    if TYPE_CHECKING:  # provided by ToncenterClient

        async def get_address_information(self, address: Address | str) -> AddressInfo: ...

        async def send_boc_return_hash(self, boc: bytes | Cell) -> SentMessage: ...

        async def get_transactions(
            self,
            address: Address | str,
            *,
            limit: int = 10,
            lt: int | None = None,
            hash: bytes | None = None,
            to_lt: int | None = None,
            archival: bool = False,
        ) -> list[Transaction]: ...

    async def wait_for_transaction(
        self,
        address: Address | str,
        *,
        after_lt: int = 0,
        predicate: Callable[[Transaction], bool] | None = None,
        timeout: float = 60.0,
        interval: float = 0.2,
        on_poll: Callable[[], None] | None = None,
    ) -> Transaction:
        """Poll until a transaction with lt > after_lt (matching ``predicate``) appears.

        Returns the oldest match. Raises TimeoutError after ``timeout`` seconds.
        """
        addr = _addr(address)
        deadline = time.monotonic() + timeout
        delay = interval
        while True:
            txs = await self._transactions_after(addr, after_lt)
            for tx in reversed(txs):  # oldest first
                if predicate is None or predicate(tx):
                    return tx
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"no matching transaction on {addr.to_str()} after lt {after_lt} "
                    f"within {timeout:g}s"
                )
            if on_poll is not None:
                on_poll()
            await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 1.5, 2.0)

    async def _transactions_after(self, addr: Address, after_lt: int) -> list[Transaction]:
        """All transactions with lt > after_lt (newest first), paging as needed."""
        out: list[Transaction] = []
        lt: int | None = None
        h: bytes | None = None
        while True:
            page = await self.get_transactions(
                addr, limit=50, lt=lt, hash=h, to_lt=after_lt or None
            )
            full = len(page) == 50
            if lt is not None and page and page[0].lt == lt:
                page = page[1:]
            out.extend(t for t in page if t.lt > after_lt)
            # after_lt=0 means "any": the newest page is enough (no walk through history)
            if not full or not page or not after_lt or len(out) >= 1000:
                return out
            lt, h = page[-1].lt, page[-1].hash

    async def wait_for_message(
        self,
        sent: SentMessage | bytes,
        address: Address | str,
        *,
        after_lt: int = 0,
        timeout: float = 60.0,
        on_poll: Callable[[], None] | None = None,
    ) -> Transaction:
        """Wait for the transaction that processed an external message we sent."""
        norm = sent.hash_norm if isinstance(sent, SentMessage) else sent
        return await self.wait_for_transaction(
            address,
            after_lt=after_lt,
            predicate=lambda t: t.in_msg is not None and t.in_msg.hash_norm == norm,
            timeout=timeout,
            on_poll=on_poll,
        )

    async def wait_for_trace(
        self,
        root: Transaction,
        *,
        timeout: float = 60.0,
        on_poll: Callable[[], None] | None = None,
    ) -> Trace:
        """Follow out_msgs to their destinations until the whole chain has executed.

        External-out messages (no destination) end a branch. Raises TimeoutError.
        """
        deadline = time.monotonic() + timeout
        trace = Trace([root])
        queue = [root]
        while queue:
            tx = queue.pop(0)
            waits: list[Awaitable[Transaction]] = []
            for msg in tx.out_msgs:
                if not msg.destination:
                    continue
                waits.append(
                    self.wait_for_transaction(
                        msg.destination,
                        after_lt=msg.created_lt,
                        predicate=_in_msg_is(msg),
                        timeout=max(0.1, deadline - time.monotonic()),
                        on_poll=on_poll,
                    )
                )
            for child in await asyncio.gather(*waits):
                trace.transactions.append(child)
                queue.append(child)
        return trace

    async def send_and_trace(
        self,
        boc: bytes | Cell,
        address: Address | str,
        *,
        timeout: float = 60.0,
        on_poll: Callable[[], None] | None = None,
    ) -> Trace:
        """Send an external message to ``address`` and wait for every transaction it causes."""
        info = await self.get_address_information(address)
        sent = await self.send_boc_return_hash(boc)
        root = await self.wait_for_message(
            sent, address, after_lt=info.last_transaction_lt, timeout=timeout, on_poll=on_poll
        )
        return await self.wait_for_trace(root, timeout=timeout, on_poll=on_poll)


def _in_msg_is(msg: Message) -> Callable[[Transaction], bool]:
    def check(t: Transaction) -> bool:
        if t.in_msg is None:
            return False
        if msg.hash and t.in_msg.hash:
            return t.in_msg.hash == msg.hash
        return t.in_msg.created_lt == msg.created_lt and t.in_msg.source == msg.source

    return check
