"""Receipt verification, client side: everything a receipt must satisfy before the
client signs a spend voucher for it (docs/protocol.md, "Client")."""

from __future__ import annotations

import base64
from dataclasses import dataclass

from pytoniq_core import Address

from client.sdk.errors import ReceiptRejected
from contracts.protocol.api import EndFrame, ModelOffer
from contracts.protocol.signed import Receipt, SignedObjectError, model_hash, signature_valid

__all__ = ["Expected", "PriceCaps", "VerifiedReceipt", "verify_receipt"]


@dataclass(frozen=True, slots=True)
class PriceCaps:
    """The most this client pays, in nanoTON per million tokens."""

    prompt: int
    completion: int

    def __post_init__(self) -> None:
        if self.prompt < 0 or self.completion < 0:
            raise ValueError("price caps are not negative")


@dataclass(frozen=True, slots=True)
class VerifiedReceipt:
    """A node receipt that passed every check, with the evidence to show for it."""

    receipt: Receipt
    boc: bytes
    signature: bytes
    node_id: str

    @property
    def amount(self) -> int:
        return self.receipt.amount

    def as_usage_extension(self) -> dict[str, str]:
        return {
            "boc": base64.b64encode(self.boc).decode(),
            "signature": self.signature.hex(),
            "node": self.node_id,
        }


@dataclass(frozen=True, slots=True)
class Expected:
    """What the client knows independently of the receipt."""

    node_id: str
    node_ed25519: bytes  # the attested key of the node whose copy was served
    job_id: bytes
    escrow: Address
    model: str
    offer: ModelOffer
    caps: PriceCaps
    request_hash: bytes  # SHA-256 of that node's sealed copy
    transcript_hash: bytes  # the opener's hash over every sealed frame received
    usage: tuple[int, int] | None  # the last running usage opened


def verify_receipt(end: EndFrame, expected: Expected) -> VerifiedReceipt:
    """Check the END frame's receipt against ``expected``; raise ReceiptRejected
    naming every failed check."""
    try:
        boc = base64.b64decode(end.receipt or "", validate=True)
        signature = bytes.fromhex(end.signature or "")
        receipt, cell_hash = Receipt.parse_boc(boc)
    except (ValueError, SignedObjectError) as e:
        raise ReceiptRejected(f"malformed receipt: {e}") from e
    except Exception as e:  # pytoniq raises bare errors on a malformed BOC
        raise ReceiptRejected(f"malformed receipt BOC: {e}") from e
    # The signature covers the hash of the cell as received (what a contract checks),
    # whose fields are exactly those parsed (from_cell refuses trailing data).
    problems = receipt_problems(receipt, cell_hash, signature, end, expected)
    if problems:
        raise ReceiptRejected("receipt rejected: " + "; ".join(problems))
    return VerifiedReceipt(receipt=receipt, boc=boc, signature=signature, node_id=expected.node_id)


def receipt_problems(
    receipt: Receipt, cell_hash: bytes, signature: bytes, end: EndFrame, x: Expected
) -> list[str]:
    problems: list[str] = []
    if not signature_valid(signature, cell_hash, x.node_ed25519):
        problems.append(f"signature is not by the attested key of node {x.node_id[:16]}")
    if receipt.job_id != int.from_bytes(x.job_id, "big"):
        problems.append("job id is not this job's")
    if receipt.escrow != x.escrow:
        problems.append("escrow is not this client's")
    if receipt.model != model_hash(x.model):
        problems.append(f"model is not {x.model!r}")
    if (receipt.price_prompt, receipt.price_completion) != (
        x.offer.price_prompt,
        x.offer.price_completion,
    ):
        problems.append("prices differ from the node's offer")
    if receipt.price_prompt > x.caps.prompt or receipt.price_completion > x.caps.completion:
        problems.append("prices exceed the client's caps")
    if receipt.amount != receipt.priced_amount:
        problems.append(f"amount {receipt.amount} is not tokens × prices ({receipt.priced_amount})")
    if receipt.request_hash != x.request_hash:
        problems.append("request_hash is not the hash of the sealed request")
    if receipt.response_hash != x.transcript_hash:
        problems.append("response_hash does not match the frames received (truncated or spliced)")
    tokens = (receipt.prompt_tokens, receipt.completion_tokens)
    if tokens != x.usage:
        problems.append(f"tokens {tokens} differ from the usage received {x.usage}")
    if tokens != (end.prompt_tokens, end.completion_tokens):
        problems.append("tokens differ from the END frame's")
    return problems
