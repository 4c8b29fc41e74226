"""Matcher tickets: a node serves only the jobs its matcher dispatched.

For every attempt it relays, the matcher signs with its ticket key (ed25519)
``TICKET_DOMAIN || node ed25519 public (32) || job id (32) || SHA-256 of the sealed
request (32)`` and sends the signature as ``TICKET_HEADER`` (hex). The node checks it
against the ticket keys it trusts before it opens the request, so a job sent around
the matcher (unmetered, so unpaid) is refused, and a ticket cannot be moved to another
node, job id or request body. The matcher publishes its key at ``GET /v1/ticket-key``.
"""

from __future__ import annotations

__all__ = ["TICKET_DOMAIN", "TICKET_HEADER", "TICKET_KEY_PATH", "ticket_message"]

TICKET_DOMAIN = b"imago/ticket/v1"
TICKET_HEADER = "X-Imago-Ticket"
TICKET_KEY_PATH = "/v1/ticket-key"


def ticket_message(node_public: bytes, job_id: bytes, request_hash: bytes) -> bytes:
    if len(node_public) != 32 or len(job_id) != 32 or len(request_hash) != 32:
        raise ValueError("a ticket binds a 32-byte node key, job id and request hash")
    return TICKET_DOMAIN + node_public + job_id + request_hash
