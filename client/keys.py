"""The client's spend key: the ed25519 key its escrow accepts vouchers from.

It lives in a keystore (``protocol.keystore``, kind ``spend``; mode 0600, refused when
group- or world-readable), by default ``$IMAGO_HOME/client/spend.key``: `imago escrow
open` makes it there and `imago gateway` signs with it. With a passphrase
(``IMAGO_SPEND_PASSPHRASE`` for both) it is encrypted at rest; without one it is stored
in clear, which is for the devnet only. Whoever reads the key can spend the escrow.
Spend keys of the earlier PKCS#8 PEM format are still read.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol import keystore

__all__ = [
    "PASSPHRASE_ENV",
    "create_spend_key",
    "load_or_create_spend_key",
    "load_spend_key",
    "public_bytes",
    "spend_public_key",
]

KIND = "spend"
PASSPHRASE_ENV = "IMAGO_SPEND_PASSPHRASE"


def public_bytes(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


def create_spend_key(path: Path, passphrase: str | None = None) -> Ed25519PrivateKey:
    """Generate a key and write it to ``path`` (mode 0600). Never overwrites a file
    (protocol.keystore.KeystoreExists)."""
    keys = keystore.Keys.generate()
    keystore.save(path, keys, kind=KIND, name="spend", passphrase=passphrase)
    return keys.ed25519


def load_spend_key(path: Path, passphrase: str | None = None) -> Ed25519PrivateKey:
    """Raises protocol.keystore.KeystoreError (WrongPassphrase, UnreadableKeystore,
    InsecureKeystore)."""
    keys, _ = keystore.load(path, passphrase)
    return keys.ed25519


def load_or_create_spend_key(path: Path, passphrase: str | None = None) -> Ed25519PrivateKey:
    """Load the key at ``path``, generating it first if the file does not exist."""
    keys, _ = keystore.load_or_create(path, passphrase, kind=KIND, name="spend")
    return keys.ed25519


def spend_public_key(path: Path, passphrase: str | None = None) -> bytes:
    """The public key of the spend keystore at ``path``; the passphrase is needed only
    for an encrypted key of the earlier format, which keeps even that sealed."""
    info = keystore.read_info(path)
    if info.ed25519_public is not None:
        return info.ed25519_public
    return public_bytes(load_spend_key(path, passphrase))
