"""The node's keys: ed25519 (receipts; the node id) and X25519 (HPKE requests).

They live in one keystore file, mode 0600. With a passphrase the file is encrypted at
rest: scrypt derives a key from the passphrase, ChaCha20-Poly1305 seals the two raw
private keys (the file format is ``protocol/keystore.py``, which other parties read it
with). The passphrase and the keys are never logged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from protocol.keystore import KeystoreError, encode_node_keystore, read_node_keystore

__all__ = ["KeystoreError", "NodeKeys", "load_or_create_keys"]


@dataclass(frozen=True)
class NodeKeys:
    ed25519: Ed25519PrivateKey
    x25519: X25519PrivateKey

    @classmethod
    def generate(cls) -> NodeKeys:
        return cls(Ed25519PrivateKey.generate(), X25519PrivateKey.generate())

    @property
    def ed25519_public(self) -> bytes:
        return self.ed25519.public_key().public_bytes_raw()

    @property
    def x25519_public(self) -> bytes:
        return self.x25519.public_key().public_bytes_raw()

    @property
    def node_id(self) -> str:
        return self.ed25519_public.hex()

    def _secret(self) -> bytes:
        return self.ed25519.private_bytes_raw() + self.x25519.private_bytes_raw()

    @classmethod
    def _from_secret(cls, secret: bytes) -> NodeKeys:
        if len(secret) != 64:
            raise KeystoreError("keystore holds malformed keys")
        return cls(
            Ed25519PrivateKey.from_private_bytes(secret[:32]),
            X25519PrivateKey.from_private_bytes(secret[32:]),
        )

    def __repr__(self) -> str:  # never print private material
        return f"NodeKeys(node_id={self.node_id})"


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def load_or_create_keys(path: Path, passphrase: str | None = None) -> NodeKeys:
    """Load the keystore at ``path``, or create one with fresh keys.

    Refuses a keystore that group or others may read (like ssh does).
    """
    if path.exists():
        return NodeKeys._from_secret(read_node_keystore(path, passphrase))
    keys = NodeKeys.generate()
    _write_private(path, encode_node_keystore(keys._secret(), keys.node_id, passphrase))
    return keys
