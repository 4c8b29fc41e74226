"""The Imago client SDK: confidential, attested, receipt-checked inference."""

from client.sdk.client import Endpoint, ImagoClient
from client.sdk.errors import (
    AttestationRejected,
    ImagoError,
    InvalidRequest,
    MatcherError,
    ReceiptRejected,
    RelayFailed,
    ResponseTampered,
    UpstreamError,
)
from client.sdk.ledger import LedgerError, SpendLedger
from client.sdk.receipts import PriceCaps, VerifiedReceipt
from client.sdk.stream import Completion, CompletionStream

__all__ = [
    "AttestationRejected",
    "Completion",
    "CompletionStream",
    "Endpoint",
    "ImagoClient",
    "ImagoError",
    "InvalidRequest",
    "LedgerError",
    "MatcherError",
    "PriceCaps",
    "ReceiptRejected",
    "RelayFailed",
    "ResponseTampered",
    "SpendLedger",
    "UpstreamError",
    "VerifiedReceipt",
]
