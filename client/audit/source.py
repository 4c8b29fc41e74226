"""Everything the audit reads: the :class:`AuditSource` interface, and :class:`LiveSource`,
its implementation over the matcher's ledger API and toncenter (with the Vault's
history of executed commits)."""

from __future__ import annotations

import json
from typing import Any, Protocol

import aiohttp
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pytoniq_core import Address

from client.audit.common import Kind, SourceError, _raw
from client.audit.epochs import CommitHistory, OnChainCommit
from contracts.chain import getters
from contracts.chain.messages.opcodes import OP_COMMIT_EPOCH
from contracts.chain.messages.vault import CommitEpoch
from contracts.chain.toncenter import ToncenterClient
from protocol.ledger import records_headers

PAGE_LIMIT = 500  # epochs and leaves per request
MAX_PAGES = 100_000  # a pagination that never ends is refused
HISTORY_PAGE = 100  # transactions per getTransactions


# --------------------------------------------------------------------- the source


class AuditSource(Protocol):
    """Everything the audit reads, from the matcher's ledger API and from the chain."""

    async def vault(self) -> Any:
        """The Vault's ``vault_data`` (``contracts.chain.getters.VaultData``)."""

    async def commit_history(self, from_epoch: int) -> CommitHistory:
        """The CommitEpoch messages the Vault executed, newest back to ``from_epoch``."""

    async def epochs(self, from_epoch: int) -> list[Any]:
        """Every published epoch from ``from_epoch`` (all pages), as JSON."""

    async def epoch(self, n: int) -> Any:
        """One published epoch, as JSON."""

    async def leaves(self, epoch: int) -> list[Any]:
        """Every page of an epoch's leaves, as JSON."""

    async def payout(self, provider: str) -> Any | None:
        """The provider's latest payout voucher, as JSON (None: there is none)."""

    async def records(self, epoch: int, kind: Kind, address: str, key: Ed25519PrivateKey) -> Any:
        """A party's records of an epoch, as JSON, authenticated with ``key``."""

    async def escrow(self, address: str) -> Any | None:
        """``escrow_data`` (None: no contract at that address)."""

    async def provider(self, address: str) -> Any | None:
        """``provider_data`` (None: no contract at that address)."""

    async def claimed(self, provider: str) -> int:
        """The Provider's ``claimed(vault)``."""


class LiveSource:
    """The matcher's ledger API over HTTP, and the chain through toncenter."""

    def __init__(
        self, matcher_url: str, chain: ToncenterClient, vault: str, *, timeout: float = 30.0
    ):
        self.base = matcher_url.rstrip("/")
        self.chain = chain
        self.vault_address = _raw(vault)
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _get(
        self, path: str, params: dict[str, Any] | None = None, headers: dict[str, str] | None = None
    ) -> Any | None:
        """The JSON answer, or None for a 404."""
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        try:
            async with self._session.get(self.base + path, params=params, headers=headers) as r:
                if r.status == 404:
                    return None
                text = await r.text()
                if r.status != 200:
                    raise SourceError(f"the matcher answered {r.status} to {path}: {text[:200]}")
        except aiohttp.ClientError as e:
            raise SourceError(f"cannot reach the matcher at {self.base}: {e}") from e
        except TimeoutError as e:
            raise SourceError(f"the matcher at {self.base} timed out on {path}") from e
        try:
            return json.loads(text)
        except ValueError:
            raise SourceError(f"the matcher's answer to {path} is not JSON") from None

    async def _required(self, path: str, params: dict[str, Any] | None = None) -> Any:
        data = await self._get(path, params)
        if data is None:
            raise SourceError(f"the matcher answered 404 to {path}")
        return data

    async def epochs(self, from_epoch: int) -> list[Any]:
        out: list[Any] = []
        cursor: int | None = from_epoch
        for _ in range(MAX_PAGES):
            if cursor is None:
                return out
            page = await self._required("/v1/ledger/epochs", {"from": cursor, "limit": PAGE_LIMIT})
            if not isinstance(page, dict) or not isinstance(page.get("epochs"), list):
                raise SourceError("the matcher's list of epochs is not {epochs: [...]}")
            out.extend(page["epochs"])
            nxt = page.get("next_from")
            if nxt is not None and (not isinstance(nxt, int) or nxt <= cursor):
                raise SourceError(f"the list of epochs does not advance (next_from {nxt!r})")
            cursor = nxt
        raise SourceError("the list of epochs never ends")

    async def epoch(self, n: int) -> Any:
        return await self._required(f"/v1/ledger/epochs/{n}")

    async def leaves(self, epoch: int) -> list[Any]:
        pages: list[Any] = []
        offset: int | None = 0
        path = f"/v1/ledger/epochs/{epoch}/leaves"
        for _ in range(MAX_PAGES):
            if offset is None:
                return pages
            page = await self._required(path, {"offset": offset, "limit": PAGE_LIMIT})
            pages.append(page)
            nxt = page.get("next_offset") if isinstance(page, dict) else None
            if nxt is not None and (not isinstance(nxt, int) or nxt <= offset):
                raise SourceError(f"epoch {epoch}: the leaves do not advance (next_offset {nxt!r})")
            offset = nxt
        raise SourceError(f"epoch {epoch}: the leaves never end")

    async def payout(self, provider: str) -> Any | None:
        return await self._get(f"/v1/ledger/payouts/{_raw(provider)}")

    async def records(self, epoch: int, kind: Kind, address: str, key: Ed25519PrivateKey) -> Any:
        headers = records_headers(key, kind, address, epoch)
        path = f"/v1/ledger/epochs/{epoch}/records"
        data = await self._get(path, {"kind": kind, "address": _raw(address)}, headers)
        if data is None:
            raise SourceError(f"the matcher has no records of {kind} {_raw(address)}")
        return data

    async def vault(self) -> Any:
        return await getters.get_vault_data(self.chain, self.vault_address)

    async def _active(self, address: str) -> bool:
        return (await self.chain.get_address_information(address)).is_active

    async def escrow(self, address: str) -> Any | None:
        if not await self._active(address):
            return None
        return await getters.get_escrow_data(self.chain, address)

    async def provider(self, address: str) -> Any | None:
        if not await self._active(address):
            return None
        return await getters.get_provider_data(self.chain, address)

    async def claimed(self, provider: str) -> int:
        return await getters.get_provider_claimed(self.chain, provider, Address(self.vault_address))

    async def commit_history(self, from_epoch: int) -> CommitHistory:
        commits: dict[int, OnChainCommit] = {}
        lt: int | None = None
        tx_hash: bytes | None = None
        for _ in range(MAX_PAGES):
            rows = await self.chain.get_transactions(
                self.vault_address, limit=HISTORY_PAGE, lt=lt, hash=tx_hash, archival=True
            )
            full_page = len(rows) == HISTORY_PAGE
            if lt is not None and rows and rows[0].lt == lt:
                rows = rows[1:]  # a page starts with the transaction it was asked from
            for tx in rows:
                commit = _executed_commit(tx)
                if commit is None:
                    continue
                commits.setdefault(commit.commit.epoch, commit)
                if commit.commit.epoch <= from_epoch:
                    return CommitHistory(commits, True)
            if not full_page or not rows:
                return CommitHistory(commits, True)
            lt, tx_hash = rows[-1].lt, rows[-1].hash
        return CommitHistory(commits, False, "the Vault's history is too long to read whole")


def _executed_commit(tx: Any) -> OnChainCommit | None:
    """The epoch commit a Vault transaction executed, if it is one."""
    msg = tx.in_msg
    try:
        if msg is None or msg.is_external_in or msg.bounced or msg.op != OP_COMMIT_EPOCH:
            return None
        if not tx.success:
            return None
        body = CommitEpoch.from_cell(msg.body)
        return OnChainCommit(body.commit, msg.body.refs[0].hash, tx.lt, tx.hash)
    except Exception:  # a malformed body: the Vault refused it
        return None
