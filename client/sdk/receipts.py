"""Receipt verification, client side: everything a receipt must satisfy before the
client signs a spend voucher for it (docs/protocol.md, "Client")."""

from __future__ import annotations

import base64
from dataclasses import dataclass

from pytoniq_core import Address

from client.sdk.errors import ReceiptRejected
from protocol.api import EndFrame, ModelOffer
from protocol.receipts import ReceiptExpectations
from protocol.receipts import receipt_problems as shared_receipt_problems
from protocol.signed import Receipt, SignedObjectError

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

    global_id: int  # the network its escrow is on (the receipt must name it)
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
    """The checks every party makes (protocol.receipts), then the client's
    own: its price caps and the usage it opened itself."""
    problems = shared_receipt_problems(
        receipt,
        cell_hash,
        signature,
        ReceiptExpectations(
            global_id=x.global_id,
            node_key=x.node_ed25519,
            job_id=int.from_bytes(x.job_id, "big"),
            escrow=x.escrow,
            model=x.model,
            prices=(x.offer.price_prompt, x.offer.price_completion),
            request_hash=x.request_hash,
            response_hash=x.transcript_hash,
            tokens=(end.prompt_tokens, end.completion_tokens),
        ),
    )
    if receipt.price_prompt > x.caps.prompt or receipt.price_completion > x.caps.completion:
        problems.append("prices exceed the client's caps")
    tokens = (receipt.prompt_tokens, receipt.completion_tokens)
    if tokens != x.usage:
        problems.append(f"tokens {tokens} differ from the usage received {x.usage}")
    return problems
