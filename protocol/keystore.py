"""The node keystore's file format, readable by every party.

A node keeps its ed25519 key (receipts; the node id) and X25519 key (HPKE) in one JSON
file, mode 0600 (``node/keys.py`` creates it). Without a passphrase the two raw private
keys are stored in hex; with one, scrypt derives a key from the passphrase and
ChaCha20-Poly1305 seals them. The format lives here, at the ground floor, so that a party
other than the node (``imago audit --provider``, run by the GPU owner) can read the
node's key without importing the node.

    {"version": 1, "node_id": <ed25519 public hex>, "secret": <64 bytes hex>}
    {"version": 1, "node_id": ..., "encryption": {"kdf": "scrypt", "n", "r", "p", "salt",
     "cipher": "chacha20-poly1305", "nonce", "ciphertext"}}
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

__all__ = [
    "KeystoreError",
    "decode_node_keystore",
    "encode_node_keystore",
    "is_node_keystore",
    "read_node_keystore",
]

FORMAT_VERSION = 1
SCRYPT_N = 2**15
SCRYPT_R = 8
SCRYPT_P = 1
AAD = b"imago/v1/node-keystore"


class KeystoreError(RuntimeError):
    """A keystore that cannot be read, decrypted or written safely."""


def _kdf(passphrase: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(passphrase.encode())


def encode_node_keystore(secret: bytes, node_id: str, passphrase: str | None) -> bytes:
    """The file for ``secret`` (ed25519 then X25519 raw private keys, 64 bytes)."""
    doc: dict[str, object] = {"version": FORMAT_VERSION, "node_id": node_id}
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


def is_node_keystore(raw: bytes) -> bool:
    """Whether ``raw`` looks like a node keystore (as opposed to another key file)."""
    try:
        doc = json.loads(raw)
    except ValueError:
        return False
    return isinstance(doc, dict) and "node_id" in doc and ("secret" in doc or "encryption" in doc)


def decode_node_keystore(raw: bytes, passphrase: str | None, path: Path | str) -> bytes:
    """The 64-byte secret (ed25519 then X25519 raw private keys) of a node keystore."""
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
            secret = bytes.fromhex(doc["secret"])
        else:
            if passphrase is None:
                raise KeystoreError(f"{path} is encrypted: give its passphrase (--passphrase-env)")
            key = _kdf(passphrase, bytes.fromhex(enc["salt"]), enc["n"], enc["r"], enc["p"])
            try:
                secret = ChaCha20Poly1305(key).decrypt(
                    bytes.fromhex(enc["nonce"]), bytes.fromhex(enc["ciphertext"]), AAD
                )
            except InvalidTag as e:
                raise KeystoreError(f"{path}: wrong passphrase (or a corrupted keystore)") from e
    except KeystoreError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise KeystoreError(f"{path}: malformed keystore ({type(e).__name__})") from e
    if len(secret) != 64:
        raise KeystoreError(f"{path}: keystore holds malformed keys")
    return secret


def read_node_keystore(path: Path, passphrase: str | None = None) -> bytes:
    """The secret in the keystore at ``path``; refuses a file group or others may read
    (like ssh does)."""
    path = Path(path)
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        raw = path.read_bytes()
    except OSError as e:
        raise KeystoreError(f"cannot read keystore {path}: {e}") from e
    if mode & 0o077:
        raise KeystoreError(f"{path} has mode {mode:o}; a keystore must be 0600 (chmod 600 {path})")
    return decode_node_keystore(raw, passphrase, path)
