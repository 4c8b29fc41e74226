"""The node's keys: ed25519 (receipts; the node id) and X25519 (HPKE requests).

They live in one keystore (``protocol.keystore``, kind ``node``; mode 0600), by default
``$IMAGO_HOME/node/node_keys.json``: `imago node serve` signs with it, and `imago provider
register` stakes its key (and records the Provider beside it, ``provider.json``). With
a passphrase the file is encrypted at rest (scrypt + ChaCha20-Poly1305). The passphrase
and the keys are never logged. Keystores of the node's earlier format are still read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from protocol import keystore
from protocol.home import NODE_KEYSTORE, NODE_PROVIDER

__all__ = [
    "NodeKeys",
    "load_or_create_keys",
    "node_public_key",
    "record_provider",
    "recorded_provider",
]

KIND = "node"


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

    def __repr__(self) -> str:  # never print private material
        return f"NodeKeys(node_id={self.node_id})"


def load_or_create_keys(path: Path, passphrase: str | None = None) -> NodeKeys:
    """Load the keystore at ``path``, or create one with fresh keys (encrypted with
    ``passphrase`` if given). Raises protocol.keystore.KeystoreError (a keystore others
    may read, a wrong passphrase, a corrupt file, a keystore with no X25519 key)."""
    keys, _ = keystore.load_or_create(path, passphrase, kind=KIND, name="node", x25519=True)
    if keys.x25519 is None:
        raise keystore.UnreadableKeystore(f"{path} is not a node keystore: it has no X25519 key")
    return NodeKeys(keys.ed25519, keys.x25519)


def node_public_key(path: Path) -> bytes | None:
    """The ed25519 public key of the node keystore at ``path``, read without its
    passphrase; None if there is none yet."""
    if not Path(path).exists():
        return None
    info = keystore.read_info(path)
    if info.ed25519_public is None:
        raise keystore.UnreadableKeystore(f"{path} is not a node keystore")
    return info.ed25519_public


def record_provider(state_dir: Path, provider: str, node_key: bytes, registry: str) -> Path:
    """Note, beside the keystore, the Provider contract staked for its key (written by
    `imago provider register`; `imago node serve` names it to the matcher by default)."""
    path = Path(state_dir) / NODE_PROVIDER
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(
        json.dumps({"provider": provider, "node_key": node_key.hex(), "registry": registry}) + "\n"
    )
    tmp.replace(path)
    return path


def recorded_provider(state_dir: Path) -> str | None:
    """The Provider recorded for the key of the keystore in ``state_dir``, if the record
    names that key (a record left from a replaced keystore is ignored)."""
    path = Path(state_dir) / NODE_PROVIDER
    try:
        record = json.loads(path.read_text())
        public = node_public_key(Path(state_dir) / NODE_KEYSTORE)
    except (OSError, ValueError, keystore.KeystoreError):
        return None
    if not isinstance(record, dict) or public is None or record.get("node_key") != public.hex():
        return None
    provider = record.get("provider")
    return provider if isinstance(provider, str) else None
