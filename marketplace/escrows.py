"""What the chain says about an escrow, before the matcher trusts a voucher for it or
relays a job it pays for.

- A voucher only moves money if the Escrow contract accepts it: signed by the spend
  key the escrow was deployed with, for the vault it pays. The matcher reads both from
  the escrow's getter the first time it sees an escrow. They are part of the escrow's
  address, so the answer never changes and is cached for good; an escrow that is not
  deployed yet is asked again next time.
- A getter can lie: any contract can answer ``escrow_data``. So the matcher recomputes
  the address an Escrow with those fields must have (the Vault's registered escrow code,
  the Vault, the owner, the spend key and the Vault's close delay) and refuses any
  other address: a look-alike, or an Escrow with another close delay (one the Vault
  would never accept a charge from).
- A job is relayed only for whoever holds the escrow's spend key (the relay request is
  signed with it), and only while the escrow is open and its deposit is above what the
  client has already signed away (the latest voucher the matcher holds). The deposit
  and state are re-read at most every ``balance_ttl_s``, off the request's way once
  known; the vouchers held are this process's (replicas each guard their own share).
"""

from __future__ import annotations

import asyncio
import time

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pytoniq_core import Address, Cell

from contracts.chain import artifacts
from contracts.chain.addresses import escrow_address
from contracts.chain.getters import (
    GetterError,
    get_escrow_data,
    get_vault_code_hashes,
    get_vault_data,
)
from contracts.chain.results import ToncenterError
from contracts.chain.toncenter import ToncenterClient

__all__ = ["EscrowBook", "EscrowMismatch", "EscrowRefused", "EscrowUnfunded"]

BALANCE_TTL_S = 5.0


class EscrowRefused(Exception):
    """The chain says no; ``code`` is the API error code that says why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class EscrowMismatch(EscrowRefused):
    """The voucher does not fit the escrow on-chain."""


class EscrowUnfunded(EscrowRefused):
    """The escrow cannot pay for another job."""


class EscrowBook:
    def __init__(
        self, chain: ToncenterClient, vault: str | None, balance_ttl_s: float = BALANCE_TTL_S
    ) -> None:
        self.chain = chain
        self.vault = Address(vault) if vault else None
        self.balance_ttl_s = balance_ttl_s
        # raw escrow → (spend key, vault, spend key parsed): fixed by the escrow's address
        self._known: dict[str, tuple[bytes, Address, Ed25519PublicKey]] = {}
        self._funds: dict[str, tuple[float, str, int]] = {}  # raw → (read at, state, deposited)
        self._refreshing: dict[str, asyncio.Task] = {}
        self._vault_terms: tuple[int, Cell] | None = None  # close delay, escrow code
        self.signed: dict[str, int] = {}  # raw escrow → cumulative of the latest voucher held

    def voucher_stored(self, escrow: str, cumulative: int) -> None:
        self.signed[escrow] = max(cumulative, self.signed.get(escrow, 0))

    async def ensure_funded(self, escrow: str) -> None:
        """Raise EscrowUnfunded unless ``escrow`` (raw form) is open with a deposit
        above what its client has already signed away."""
        funds = self._funds.get(escrow)
        if funds is None:
            funds = await self._read_funds(escrow)
        elif time.monotonic() - funds[0] > self.balance_ttl_s and escrow not in self._refreshing:
            task = asyncio.create_task(self._read_funds(escrow))
            self._refreshing[escrow] = task
            task.add_done_callback(lambda _: self._refreshing.pop(escrow, None))
        _, state, deposited = funds
        if state != "open":
            raise EscrowUnfunded("escrow_closed", f"escrow {escrow} is {state}: it pays no more")
        if deposited <= self.signed.get(escrow, 0):
            raise EscrowUnfunded(
                "escrow_exhausted",
                f"escrow {escrow} is spent: its deposit of {deposited} nanoTON is all signed "
                "away; deposit more to go on",
            )

    def signed_by_spend_key(self, escrow: str, signature: bytes, message: bytes) -> bool:
        """Whether the spend key of ``escrow`` (raw form, read by ``ensure_funded``)
        signed ``message``."""
        try:
            self._known[escrow][2].verify(signature, message)
        except InvalidSignature:
            return False
        return True

    async def _read_funds(self, escrow: str) -> tuple[float, str, int]:
        await self._read(Address(escrow), EscrowUnfunded)
        return self._funds[escrow]

    async def _read(self, escrow: Address, refusal: type[EscrowRefused]) -> None:
        """One getter call feeds both what never changes and what does."""
        raw = escrow.to_str(is_user_friendly=False)
        try:
            data = await get_escrow_data(self.chain, escrow)
        except (GetterError, ToncenterError, ValueError) as e:
            raise refusal("unknown_escrow", f"escrow {raw} is not deployed on-chain ({e})") from e
        if self.vault is not None:
            if data.vault != self.vault:
                raise refusal("wrong_vault", f"escrow {raw} pays another vault")
            close_delay, code = await self._terms(self.vault, refusal)
            genuine = escrow_address(self.vault, data.owner, data.spend_key, close_delay, code)
            if genuine != escrow:
                raise refusal(
                    "forged_escrow",
                    f"{raw} is no Escrow of this vault: an Escrow of its owner and spend key "
                    f"is at {genuine.to_str(is_user_friendly=False)}",
                )
        spend_key = data.spend_key.to_bytes(32, "big")
        self._known[raw] = (spend_key, data.vault, Ed25519PublicKey.from_public_bytes(spend_key))
        self._funds[raw] = (time.monotonic(), data.state_name, data.deposited)

    async def _terms(self, vault: Address, refusal: type[EscrowRefused]) -> tuple[int, Cell]:
        """The Vault's close delay and the escrow code it authenticates charges with
        (which must be the code this build knows: only then can the address be
        recomputed)."""
        if self._vault_terms is None:
            try:
                data = await get_vault_data(self.chain, vault)
                escrow_hash, _ = await get_vault_code_hashes(self.chain, vault)
            except (GetterError, ToncenterError, ValueError) as e:
                raise refusal("vault_unavailable", f"the vault cannot be read: {e}") from e
            code = artifacts.load("escrow").code
            if code.hash != escrow_hash:
                raise refusal(
                    "vault_unknown_code",
                    "the vault authenticates escrows of a code this matcher does not know",
                )
            self._vault_terms = (data.escrow_close_delay, code)
        return self._vault_terms

    async def check(self, escrow: Address, spend_public: bytes) -> None:
        raw = escrow.to_str(is_user_friendly=False)
        if raw not in self._known:
            await self._read(escrow, EscrowMismatch)
        spend_key, vault, _ = self._known[raw]
        if spend_key != spend_public:
            raise EscrowMismatch(
                "wrong_spend_key", "the voucher is not signed by the escrow's on-chain spend key"
            )
        if self.vault is not None and vault != self.vault:
            raise EscrowMismatch("wrong_vault", "the escrow pays another vault")
