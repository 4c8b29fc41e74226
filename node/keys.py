"""The node's keys: ed25519 (receipts; the node id) and X25519 (HPKE requests).

They live in one keystore file, mode 0600. With a passphrase the file is encrypted at
rest: scrypt derives a key from the passphrase, ChaCha20-Poly1305 seals the two raw
private keys. The passphrase and the keys are never logged.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

__all__ = ["KeystoreError", "NodeKeys", "load_or_create_keys"]

FORMAT_VERSION = 1
SCRYPT_N = 2**15
SCRYPT_R = 8
SCRYPT_P = 1
AAD = b"imago/v1/node-keystore"


class KeystoreError(RuntimeError):
    """A keystore that cannot be read, decrypted or written safely."""


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


def _kdf(passphrase: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(passphrase.encode())


def _encode(keys: NodeKeys, passphrase: str | None) -> bytes:
    secret = keys._secret()
    doc: dict[str, object] = {"version": FORMAT_VERSION, "node_id": keys.node_id}
    if passphrase is None:
        doc["secret"] = secret.hex()
    else:
        salt, nonce = os.urandom(16), os.urandom(12)
        key = _kdf(passphrase, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
        doc["encryption"] = {
            "kdf": "scrypt",
            "n": SCRYPT_N,
            "r": SCRYPT_R,
            "p": SCRYPT_P,
            "salt": salt.hex(),
            "cipher": "chacha20-poly1305",
            "nonce": nonce.hex(),
            "ciphertext": ChaCha20Poly1305(key).encrypt(nonce, secret, AAD).hex(),
        }
    return json.dumps(doc, indent=1).encode()


def _decode(raw: bytes, passphrase: str | None, path: Path) -> NodeKeys:
    try:
        doc = json.loads(raw)
        if doc.get("version") != FORMAT_VERSION:
            raise KeystoreError(f"{path}: unsupported keystore version {doc.get('version')!r}")
        enc = doc.get("encryption")
        if enc is None:
            if passphrase is not None:
                raise KeystoreError(
                    f"{path} is not encrypted but a passphrase was given; refusing to guess"
                )
            return NodeKeys._from_secret(bytes.fromhex(doc["secret"]))
        if passphrase is None:
            raise KeystoreError(f"{path} is encrypted: give its passphrase (--passphrase-env)")
        key = _kdf(passphrase, bytes.fromhex(enc["salt"]), enc["n"], enc["r"], enc["p"])
        try:
            secret = ChaCha20Poly1305(key).decrypt(
                bytes.fromhex(enc["nonce"]), bytes.fromhex(enc["ciphertext"]), AAD
            )
        except InvalidTag as e:
            raise KeystoreError(f"{path}: wrong passphrase (or a corrupted keystore)") from e
        return NodeKeys._from_secret(secret)
    except KeystoreError:
        raise
    except (ValueError, KeyError, TypeError) as e:
        raise KeystoreError(f"{path}: malformed keystore ({type(e).__name__})") from e


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
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise KeystoreError(
                f"{path} has mode {mode:o}; a keystore must be 0600 (chmod 600 {path})"
            )
        return _decode(path.read_bytes(), passphrase, path)
    keys = NodeKeys.generate()
    _write_private(path, _encode(keys, passphrase))
    return keys
