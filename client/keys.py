"""The client's spend key: an ed25519 key in a 0600 keystore file.

The keystore is PKCS#8 PEM. With a passphrase it is encrypted (the ``cryptography``
package's best available scheme: AES-256-CBC under a scrypt/PBKDF2-derived key);
without one it is stored in clear, which is for the devnet only. The key signs spend
vouchers, so whoever reads it can spend the escrow: the file is created with mode 0600
and refused when group- or world-readable.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

__all__ = [
    "KeystoreError",
    "create_spend_key",
    "load_or_create_spend_key",
    "load_spend_key",
    "public_bytes",
]


class KeystoreError(Exception):
    """A keystore that is missing, unreadable, too permissive or wrongly encrypted."""


def public_bytes(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


def _encryption(passphrase: str | None) -> serialization.KeySerializationEncryption:
    if passphrase:
        return serialization.BestAvailableEncryption(passphrase.encode())
    return serialization.NoEncryption()


def create_spend_key(path: Path, passphrase: str | None = None) -> Ed25519PrivateKey:
    """Generate a key and write it to ``path`` (mode 0600). Never overwrites a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, _encryption(passphrase)
    )
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as e:
        raise KeystoreError(f"{path} already exists; refusing to overwrite a key") from e
    try:
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)
    return key


def load_spend_key(path: Path, passphrase: str | None = None) -> Ed25519PrivateKey:
    path = Path(path)
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except OSError as e:
        raise KeystoreError(f"cannot read keystore {path}: {e}") from e
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeystoreError(
            f"keystore {path} is accessible by other users (mode {stat.S_IMODE(mode):o}); "
            "chmod 600 it"
        )
    try:
        key = serialization.load_pem_private_key(data, passphrase.encode() if passphrase else None)
    except TypeError as e:  # encrypted without a passphrase, or the reverse
        raise KeystoreError(f"keystore {path}: {e}") from e
    except ValueError as e:
        raise KeystoreError(f"keystore {path}: wrong passphrase or corrupt file") from e
    if not isinstance(key, Ed25519PrivateKey):
        raise KeystoreError(f"keystore {path} does not hold an ed25519 key")
    return key


def load_or_create_spend_key(path: Path, passphrase: str | None = None) -> Ed25519PrivateKey:
    """Load the key at ``path``, generating it first if the file does not exist."""
    path = Path(path)
    if not path.exists():
        try:
            return create_spend_key(path, passphrase)
        except KeystoreError:
            pass  # another process created it first: load theirs
    return load_spend_key(path, passphrase)
