"""The checks every party makes of a node's receipt before trusting it.

The client checks a receipt before it pays for it; the matcher before it records a
job as completed. Both run ``receipt_problems`` over what each knows independently of
the receipt; the client adds its own (price caps, the usage it opened).
"""

from __future__ import annotations

from dataclasses import dataclass

from pytoniq_core import Address

from protocol.signed import Receipt, model_hash, signature_valid

__all__ = ["ReceiptExpectations", "receipt_problems"]


@dataclass(frozen=True, slots=True)
class ReceiptExpectations:
    global_id: int  # the network the receipt must name (config param 19)
    node_key: bytes  # the attested ed25519 key of the node that served
    job_id: int
    escrow: Address
    model: str
    prices: tuple[int, int]  # the node's offer: nanoTON per million prompt, completion tokens
    request_hash: bytes  # SHA-256 of the sealed request that node received
    response_hash: bytes  # SHA-256 over every sealed frame, in order
    tokens: tuple[int, int]  # prompt and completion tokens the END frame announces


def receipt_problems(
    receipt: Receipt, cell_hash: bytes, signature: bytes, x: ReceiptExpectations
) -> list[str]:
    """Every way ``receipt`` (whose cell as received hashes to ``cell_hash``) fails
    ``x``; empty when it is good."""
    problems: list[str] = []
    if not signature_valid(signature, cell_hash, x.node_key):
        problems.append(f"signature is not by the attested key {x.node_key.hex()[:16]}")
    if receipt.global_id != x.global_id:
        problems.append(f"signed for network {receipt.global_id}, not {x.global_id}")
    if receipt.job_id != x.job_id:
        problems.append("job id is not this job's")
    if receipt.escrow != x.escrow:
        problems.append("escrow is not the client's")
    if receipt.model != model_hash(x.model):
        problems.append(f"model is not {x.model!r}")
    if (receipt.price_prompt, receipt.price_completion) != x.prices:
        problems.append("prices differ from the node's offer")
    if receipt.amount != receipt.priced_amount:
        problems.append(f"amount {receipt.amount} is not tokens × prices ({receipt.priced_amount})")
    if receipt.request_hash != x.request_hash:
        problems.append("request_hash is not the hash of the sealed request")
    if receipt.response_hash != x.response_hash:
        problems.append("response_hash does not match the frames relayed (truncated or spliced)")
    tokens = (receipt.prompt_tokens, receipt.completion_tokens)
    if tokens != x.tokens:
        problems.append(f"tokens {tokens} differ from the END frame's {x.tokens}")
    if sum(tokens) == 0:
        problems.append("a receipt for 0 tokens")
    return problems
