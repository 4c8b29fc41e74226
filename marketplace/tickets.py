"""The matcher's ticket key: it signs every attempt the relay sends a node.

Nodes serve only jobs with a ticket under the key of the matcher they registered with
(see ``protocol.tickets``). The key lives in a wallet-format keystore file
(``contracts.chain.wallet``, mode 0600; one that others may read is refused), created at the
first start in the state dir, or at ``--ticket-key PATH`` so that replicas share one.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from contracts.chain.wallet import KeystoreError, WalletKeys, create_keystore, load_keystore
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
    """Raises contracts.chain.wallet.KeystoreError for a file that is not a keystore or that
    others may read."""
    if not path.exists():
        try:
            create_keystore(path, WalletKeys.generate(mnemonic=False), name="matcher-ticket")
        except KeystoreError:
            if not path.exists():  # else another replica just created it: share theirs
                raise
    keys, _ = load_keystore(path)
    return TicketSigner(Ed25519PrivateKey.from_private_bytes(keys.private_key[:32]))
