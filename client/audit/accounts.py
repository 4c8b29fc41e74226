"""Each party's on-chain account against the ledger: a provider's payout voucher and
claims, an escrow's charges. Pure functions over parsed data."""

from __future__ import annotations

from typing import Any

from client.audit.common import Latest, _b64, _raw, _signature
from client.audit.report import Findings
from protocol.ledger import LedgerFormatError
from protocol.signed import PayoutVoucher, SignedObjectError, signature_valid

# --------------------------------------------------------------------- vouchers, accounts


def _same(name: str, shown: Any, signed: str) -> bool:
    try:
        if name in ("provider", "vault"):
            return _raw(str(shown)) == signed
        return str(int(shown)) == signed
    except Exception:
        return False


def check_payout(
    provider: str,
    latest: Latest,
    payout: Any,
    vault: str,
    operator_key: bytes,
    last_epoch: int,
    earned_sum: int | None = None,
) -> Findings:
    """The provider's latest payout voucher is operator-signed, for this Vault and this
    provider, and pays exactly its latest committed cumulative (``earned_sum``, the sum of
    all its leaves, when auditing from epoch 1)."""
    cumulative, epoch, index = latest
    out = Findings(epoch=epoch, leaf=index, kind="provider", address=provider)
    if payout is None:
        out.add(
            "payout",
            "no payout voucher published for a provider with committed leaves",
            cumulative,
            "none",
        )
        return out
    try:
        if not isinstance(payout, dict):
            raise LedgerFormatError("not a JSON object")
        voucher, cell_hash = PayoutVoucher.parse_boc(_b64(payout.get("voucher"), "voucher"))
        signature = _signature(payout.get("signature"), "signature")
    except (LedgerFormatError, SignedObjectError) as e:
        out.add("payout", f"unreadable payout voucher: {e}")
        return out
    if not signature_valid(signature, cell_hash, operator_key):
        out.add(
            "payout-signature",
            "the payout voucher is not signed by the Vault's operator key",
            operator_key.hex(),
            "another signature",
        )
    if _raw(voucher.vault) != _raw(vault):
        out.add(
            "payout-vault", "the voucher is for another vault", _raw(vault), _raw(voucher.vault)
        )
    if _raw(voucher.provider) != _raw(provider):
        out.add(
            "payout-provider",
            "the voucher is for another provider",
            _raw(provider),
            _raw(voucher.provider),
        )
    for name, signed in (
        ("provider", _raw(voucher.provider)),
        ("vault", _raw(voucher.vault)),
        ("epoch", str(voucher.epoch)),
        ("cumulative", str(voucher.cumulative)),
    ):
        shown = payout.get(name)
        if not _same(name, shown, signed):
            out.add(f"payout-{name}", f"{name} differs from the signed voucher", signed, shown)
    if voucher.cumulative != cumulative:
        out.add(
            "payout-cumulative",
            "the latest payout voucher does not pay the provider's latest committed cumulative",
            cumulative,
            voucher.cumulative,
        )
    elif earned_sum is not None and voucher.cumulative != earned_sum:
        out.add(
            "payout-sum",
            "the payout voucher is not the sum of the provider's leaves",
            earned_sum,
            voucher.cumulative,
        )
    if not epoch <= voucher.epoch <= last_epoch:
        out.add(
            "payout-epoch",
            "the voucher's epoch is not between the provider's latest "
            "leaf and the last committed epoch",
            f"{epoch}..{last_epoch}",
            voucher.epoch,
        )
    return out


def check_provider_account(
    provider: str, latest: Latest, data: Any, claimed: int | None, registry: str
) -> Findings:
    """The provider is a Provider of the Vault's Registry and has claimed from this Vault
    no more than its committed cumulative."""
    cumulative, epoch, index = latest
    out = Findings(epoch=epoch, leaf=index, kind="provider", address=provider)
    if data is None:
        out.add("provider-account", "no Provider contract at this address")
        return out
    if _raw(data.registry) != _raw(registry):
        out.add(
            "provider-registry",
            "the Provider belongs to another Registry",
            _raw(registry),
            _raw(data.registry),
        )
    if claimed is not None and claimed > cumulative:
        out.add(
            "claimed",
            "the Provider claimed more than its committed cumulative",
            f"<= {cumulative}",
            claimed,
        )
    return out


def check_escrow_account(
    escrow: str,
    latest: Latest,
    cumulatives: list[int],
    seed: int | None,
    data: Any,
    vault: str,
) -> Findings:
    """The escrow is one of this Vault's, and its on-chain ``charged`` is 0 or one of its
    committed cumulatives, never above the latest (``seed``: its cumulative before the
    audited window, when auditing from a later epoch: anything up to it is accepted)."""
    cumulative, epoch, index = latest
    out = Findings(epoch=epoch, leaf=index, kind="escrow", address=escrow)
    if data is None:
        out.add("escrow-account", "no Escrow contract at this address")
        return out
    if _raw(data.vault) != _raw(vault):
        out.add("escrow-vault", "the Escrow pays another vault", _raw(vault), _raw(data.vault))
    charged = data.charged
    if charged > cumulative:
        out.add(
            "charged",
            "the Escrow was charged more than its committed cumulative",
            f"<= {cumulative}",
            charged,
        )
    elif charged and charged not in cumulatives and not (seed is not None and charged <= seed):
        out.add(
            "charged",
            "the Escrow's charged is none of its committed cumulatives",
            "0 or one of " + ", ".join(map(str, cumulatives[-5:])),
            charged,
        )
    return out
