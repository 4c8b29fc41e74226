"""What the chain says about an escrow before the matcher trusts a voucher for it.

A voucher only moves money if the Escrow contract accepts it: signed by the spend key
the escrow was deployed with, for the vault it pays. The matcher reads both from the
chain (the escrow's getter) the first time it sees an escrow. An escrow's spend key
and vault are part of its address, so the answer never changes and is cached for good;
an escrow that is not deployed yet is asked again next time.
"""

from __future__ import annotations

from pytoniq_core import Address

from contracts.getters import GetterError, get_escrow_data
from contracts.toncenter import ToncenterClient, ToncenterError

__all__ = ["EscrowBook", "EscrowMismatch"]


class EscrowMismatch(Exception):
    """The voucher does not fit the escrow on-chain; ``code`` says how."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class EscrowBook:
    def __init__(self, chain: ToncenterClient, vault: str | None) -> None:
        self.chain = chain
        self.vault = Address(vault) if vault else None
        self._known: dict[str, tuple[bytes, Address]] = {}  # raw escrow → (spend key, vault)

    async def check(self, escrow: Address, spend_public: bytes) -> None:
        raw = escrow.to_str(is_user_friendly=False)
        known = self._known.get(raw)
        if known is None:
            try:
                data = await get_escrow_data(self.chain, escrow)
            except (GetterError, ToncenterError, ValueError) as e:
                raise EscrowMismatch(
                    "unknown_escrow", f"escrow {raw} is not deployed on-chain ({e})"
                ) from e
            known = (data.spend_key.to_bytes(32, "big"), data.vault)
            self._known[raw] = known
        spend_key, vault = known
        if spend_key != spend_public:
            raise EscrowMismatch(
                "wrong_spend_key", "the voucher is not signed by the escrow's on-chain spend key"
            )
        if self.vault is not None and vault != self.vault:
            raise EscrowMismatch("wrong_vault", "the escrow pays another vault")
