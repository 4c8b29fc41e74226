"""The matcher's ticket key: it signs every attempt the relay sends a node.

Nodes serve only jobs with a ticket under the key of the matcher they registered with
(see ``protocol.tickets``). The key lives in a keystore (``protocol.keystore``, kind
``ticket``; mode 0600, one that others may read is refused), created at the first start
in the state dir (``ticket_key.json``), or at ``--ticket-key PATH`` so that replicas share
one. Ticket keys in the earlier wallet format are still read.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol import keystore
from protocol.tickets import ticket_message

__all__ = ["TicketSigner", "load_or_create_ticket_key"]


class TicketSigner:
    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self.public = key.public_key().public_bytes_raw()

    def sign(self, node_public: bytes, job_id: bytes, request_hash: bytes) -> str:
        """The ticket header's value for one attempt."""
        return self._key.sign(ticket_message(node_public, job_id, request_hash)).hex()


def load_or_create_ticket_key(path: Path) -> TicketSigner:
    """Raises protocol.keystore.KeystoreError for a file that is not a keystore or that
    others may read. Replicas starting at once share whichever key is written first."""
    keys, _ = keystore.load_or_create(path, kind="ticket", name="matcher-ticket")
    return TicketSigner(keys.ed25519)
