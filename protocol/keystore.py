"""One keystore format for every key Imago keeps: wallets, node keys, spend keys, the
operator key and the matcher's ticket key.

A keystore is a JSON file of mode 0600 (one that group or others may read is refused,
as ssh does). It holds an ed25519 key, optionally an X25519 key (a node's HPKE key) and
a TON mnemonic (a wallet's), and says in clear what it is::

    {
      "format": "imago-keystore-2",
      "kind": "node",                    # wallet | node | spend | operator | ticket | ...
      "name": "node",
      "created_at": 1760000000,
      "public": {"ed25519": "<hex>", "x25519": "<hex>"},
      "metadata": {},                    # public, e.g. a wallet's version, network, address
      "secret": {"ed25519": "<hex seed>", "x25519": "<hex>", "mnemonic": "<24 words>"}
    }

With a passphrase, ``secret`` is replaced by ``crypto``: scrypt (N=2^15, r=8, p=1, a
random 16-byte salt) derives a 32-byte key, and ChaCha20-Poly1305 (random 12-byte nonce)
seals the secret's JSON, with everything else in the file as associated data, so that
the public part cannot be altered unnoticed either. Neither the passphrase nor a private
key is ever logged; :class:`Keys` prints only public keys.

Errors, all :class:`KeystoreError`: :class:`WrongPassphrase` (wrong or missing),
:class:`UnreadableKeystore` (missing, corrupt, not a keystore), :class:`InsecureKeystore`
(others may read it) and :class:`KeystoreExists` (refusing to overwrite).

Files of the three earlier formats are still read (never rewritten): the wallet
keystore (``imago-keystore-1``, also used for role keys and the ticket key), the node
keystore (``{"version": 1, "node_id": ...}``) and the spend key's PKCS#8 PEM.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import stat
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

__all__ = [
    "FORMAT",
    "InsecureKeystore",
    "KeystoreError",
    "KeystoreExists",
    "KeystoreInfo",
    "Keys",
    "UnreadableKeystore",
    "WrongPassphrase",
    "check_private",
    "load",
    "load_or_create",
    "read_info",
    "save",
]

FORMAT = "imago-keystore-2"
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1
_MAX_SCRYPT_N, _MAX_SCRYPT_R, _MAX_SCRYPT_P = 2**20, 32, 16  # a file cannot ask for more
_CIPHER = "chacha20-poly1305"
_AAD_TAG = b"imago-keystore-2\n"

LEGACY_WALLET = "imago-keystore-1"  # contracts.chain.wallet, before this module
LEGACY_NODE = "node-keystore-1"  # node.keys, before this module
LEGACY_PEM = "pkcs8-pem"  # client.keys, before this module


class KeystoreError(Exception):
    """A keystore that cannot be used; one of the subclasses below says why."""


class WrongPassphrase(KeystoreError):
    """The passphrase does not open the keystore, or it is encrypted and none was given."""


class UnreadableKeystore(KeystoreError):
    """The file is missing, unreadable, corrupt, or not a keystore."""


class InsecureKeystore(KeystoreError):
    """Group or others may read the file: it is refused until it is 0600."""


class KeystoreExists(KeystoreError):
    """A keystore is already there; keys are never overwritten unless asked to."""


@dataclass(frozen=True, eq=False)
class Keys:
    """What a keystore holds. ``repr`` shows public keys only."""

    ed25519: Ed25519PrivateKey
    x25519: X25519PrivateKey | None = None
    mnemonic: tuple[str, ...] | None = None

    @classmethod
    def generate(cls, *, x25519: bool = False) -> Keys:
        return cls(Ed25519PrivateKey.generate(), X25519PrivateKey.generate() if x25519 else None)

    @property
    def ed25519_public(self) -> bytes:
        return self.ed25519.public_key().public_bytes_raw()

    @property
    def x25519_public(self) -> bytes | None:
        return None if self.x25519 is None else self.x25519.public_key().public_bytes_raw()

    @property
    def seed(self) -> bytes:
        """The ed25519 private key's 32 raw bytes."""
        return self.ed25519.private_bytes_raw()

    def __repr__(self) -> str:
        x = f", x25519={self.x25519_public.hex()}" if self.x25519 is not None else ""
        return f"Keys(ed25519={self.ed25519_public.hex()}{x})"


@dataclass(frozen=True)
class KeystoreInfo:
    """The public part of a keystore: what :func:`read_info` tells without a passphrase."""

    path: Path
    format: str  # FORMAT, or LEGACY_WALLET / LEGACY_NODE / LEGACY_PEM
    kind: str
    name: str
    # None only for what an old file keeps sealed (a legacy node's X25519 key, the
    # public key of an encrypted PEM)
    ed25519_public: bytes | None
    x25519_public: bytes | None
    encrypted: bool
    created_at: int | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def legacy(self) -> bool:
        return self.format != FORMAT


# ----------------------------------------------------------------- writing


def save(
    path: str | Path,
    keys: Keys,
    *,
    kind: str,
    name: str | None = None,
    metadata: dict[str, Any] | None = None,
    passphrase: str | None = None,
    overwrite: bool = False,
) -> KeystoreInfo:
    """Write ``keys`` to a new keystore at ``path`` (mode 0600; its directory, if made
    here, 0700). Encrypted when ``passphrase`` is non-empty. Raises KeystoreExists
    rather than replace a file, unless ``overwrite``."""
    p = Path(path)
    doc: dict[str, Any] = {
        "format": FORMAT,
        "kind": kind,
        "name": name or p.stem,
        "created_at": int(time.time()),
        "public": {"ed25519": keys.ed25519_public.hex()},
        "metadata": dict(metadata or {}),
    }
    if keys.x25519 is not None:
        doc["public"]["x25519"] = keys.x25519_public.hex()  # type: ignore[union-attr]
    secret: dict[str, Any] = {"ed25519": keys.seed.hex()}
    if keys.x25519 is not None:
        secret["x25519"] = keys.x25519.private_bytes_raw().hex()
    if keys.mnemonic is not None:
        secret["mnemonic"] = " ".join(keys.mnemonic)
    if passphrase:
        salt, nonce = secrets.token_bytes(16), secrets.token_bytes(12)
        key = _kdf(passphrase, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
        sealed = ChaCha20Poly1305(key).encrypt(nonce, json.dumps(secret).encode(), _aad(doc))
        doc["crypto"] = {
            "kdf": "scrypt",
            "n": SCRYPT_N,
            "r": SCRYPT_R,
            "p": SCRYPT_P,
            "salt": salt.hex(),
            "cipher": _CIPHER,
            "nonce": nonce.hex(),
            "ciphertext": sealed.hex(),
        }
    else:
        doc["secret"] = secret
    _write_private(p, (json.dumps(doc, indent=2) + "\n").encode(), overwrite)
    return _info_v2(p, doc)


def _write_private(path: Path, data: bytes, overwrite: bool) -> None:
    """Write a whole file at once: a reader never sees half a key, and a concurrent
    creator either wins or gets KeystoreExists."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not overwrite and path.exists():
        raise KeystoreExists(f"{path} already exists; refusing to overwrite a key")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:  # mkstemp makes it 0600 whatever the umask
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
            return
        try:
            os.link(tmp, path)  # fails if the name exists: no overwrite, no half file
        except FileExistsError:
            raise KeystoreExists(f"{path} already exists; refusing to overwrite a key") from None
        except OSError:  # a file system without hard links
            try:
                out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                raise KeystoreExists(
                    f"{path} already exists; refusing to overwrite a key"
                ) from None
            with os.fdopen(out, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


# ----------------------------------------------------------------- reading


def check_private(path: str | Path) -> None:
    """Raise InsecureKeystore if group or others may read or write ``path``."""
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise UnreadableKeystore(f"no keystore at {p}") from None
    except OSError as e:
        raise UnreadableKeystore(f"cannot read keystore {p}: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise UnreadableKeystore(f"{p} is not a file")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise InsecureKeystore(
            f"{p} has mode {mode:o}: a keystore must be 0600 (run `chmod 600 {p}`)"
        )


def read_info(path: str | Path) -> KeystoreInfo:
    """The public part of a keystore, without a passphrase (and without the permission
    check: nothing secret is used)."""
    p = Path(path)
    raw = _read(p)
    kind, doc = _parse(p, raw)
    if kind == FORMAT:
        return _info_v2(p, doc)
    if kind == LEGACY_WALLET:
        return _info_wallet1(p, doc)
    if kind == LEGACY_NODE:
        return _info_node1(p, doc)
    return _info_pem(p, raw)


def load(path: str | Path, passphrase: str | None = None) -> tuple[Keys, KeystoreInfo]:
    """The keys in ``path`` and its public part.

    Raises InsecureKeystore for a file others may read, WrongPassphrase if it is
    encrypted and ``passphrase`` does not open it, UnreadableKeystore if it is missing,
    corrupt or no keystore. A passphrase given for a file stored in clear is not needed
    and not checked (``info.encrypted`` says so).
    """
    p = Path(path)
    check_private(p)
    raw = _read(p)
    kind, doc = _parse(p, raw)
    passphrase = passphrase or None
    if kind == FORMAT:
        return _load_v2(p, doc, passphrase)
    if kind == LEGACY_WALLET:
        return _load_wallet1(p, doc, passphrase)
    if kind == LEGACY_NODE:
        return _load_node1(p, doc, passphrase)
    return _load_pem(p, raw, passphrase)


def load_or_create(
    path: str | Path,
    passphrase: str | None = None,
    *,
    kind: str,
    name: str | None = None,
    x25519: bool = False,
    metadata: dict[str, Any] | None = None,
) -> tuple[Keys, KeystoreInfo]:
    """Load ``path``, or first create it with fresh keys (an X25519 key too if asked).
    If another process creates it at the same moment, both end up with its keys."""
    p = Path(path)
    if not p.exists():
        with contextlib.suppress(KeystoreExists):
            save(
                p,
                Keys.generate(x25519=x25519),
                kind=kind,
                name=name,
                metadata=metadata,
                passphrase=passphrase,
            )
    return load(p, passphrase)


def _read(p: Path) -> bytes:
    try:
        return p.read_bytes()
    except FileNotFoundError:
        raise UnreadableKeystore(f"no keystore at {p}") from None
    except OSError as e:
        raise UnreadableKeystore(f"cannot read keystore {p}: {e.strerror or e}") from None


def _parse(p: Path, raw: bytes) -> tuple[str, dict[str, Any]]:
    """Which format ``raw`` is in, and its JSON document (empty for PEM)."""
    if raw.lstrip().startswith(b"-----BEGIN"):
        return LEGACY_PEM, {}
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise UnreadableKeystore(f"{p} is not a keystore (neither JSON nor PEM)") from None
    if not isinstance(doc, dict):
        raise UnreadableKeystore(f"{p} is not a keystore")
    if doc.get("format") == FORMAT:
        return FORMAT, doc
    if doc.get("format") == LEGACY_WALLET:
        return LEGACY_WALLET, doc
    if doc.get("version") == 1 and "node_id" in doc:
        return LEGACY_NODE, doc
    raise UnreadableKeystore(f"{p} is not an Imago keystore (format {doc.get('format')!r})")


def _kdf(passphrase: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(passphrase.encode("utf-8"))


def _open_sealed(
    p: Path,
    crypto: dict[str, Any],
    passphrase: str | None,
    aad: bytes,
    decode: Any = bytes.fromhex,
) -> bytes:
    """Decrypt a ``crypto`` section (scrypt + ChaCha20-Poly1305) of any JSON format."""
    if not passphrase:
        raise WrongPassphrase(f"{p} is encrypted: a passphrase is needed")
    try:
        if crypto.get("kdf") != "scrypt" or crypto.get("cipher") != _CIPHER:
            raise UnreadableKeystore(
                f"{p}: unsupported encryption {crypto.get('kdf')}/{crypto.get('cipher')}"
            )
        n, r, par = int(crypto["n"]), int(crypto["r"]), int(crypto["p"])
        if not (1 < n <= _MAX_SCRYPT_N and n & (n - 1) == 0) or not (
            0 < r <= _MAX_SCRYPT_R and 0 < par <= _MAX_SCRYPT_P
        ):
            raise UnreadableKeystore(f"{p}: scrypt parameters out of range")
        key = _kdf(passphrase, decode(crypto["salt"]), n, r, par)
        nonce, sealed = decode(crypto["nonce"]), decode(crypto["ciphertext"])
    except (KeyError, TypeError, ValueError) as e:
        raise UnreadableKeystore(f"{p}: malformed encryption section ({type(e).__name__})") from e
    try:
        return ChaCha20Poly1305(key).decrypt(nonce, sealed, aad)
    except (InvalidTag, ValueError):
        raise WrongPassphrase(f"wrong passphrase for {p} (or the file was altered)") from None


# -- this format


def _aad(doc: dict[str, Any]) -> bytes:
    public = {k: v for k, v in doc.items() if k not in ("secret", "crypto")}
    return _AAD_TAG + json.dumps(public, sort_keys=True, separators=(",", ":")).encode()


def _info_v2(p: Path, doc: dict[str, Any]) -> KeystoreInfo:
    try:
        public = doc["public"]
        x = public.get("x25519")
        return KeystoreInfo(
            path=p,
            format=FORMAT,
            kind=str(doc["kind"]),
            name=str(doc.get("name") or p.stem),
            ed25519_public=_hex32(public["ed25519"]),
            x25519_public=_hex32(x) if x is not None else None,
            encrypted="crypto" in doc,
            created_at=doc.get("created_at"),
            metadata=dict(doc.get("metadata") or {}),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise UnreadableKeystore(f"{p}: malformed keystore ({type(e).__name__})") from e


def _load_v2(p: Path, doc: dict[str, Any], passphrase: str | None) -> tuple[Keys, KeystoreInfo]:
    info = _info_v2(p, doc)
    if "crypto" in doc:
        plain = _open_sealed(p, doc["crypto"], passphrase, _aad(doc))
        try:
            secret = json.loads(plain)
        except ValueError:
            raise UnreadableKeystore(f"{p}: the sealed secret is not JSON") from None
    else:
        secret = doc.get("secret")
    try:
        mnemonic = secret.get("mnemonic")
        keys = Keys(
            Ed25519PrivateKey.from_private_bytes(_hex32(secret["ed25519"])),
            X25519PrivateKey.from_private_bytes(_hex32(secret["x25519"]))
            if "x25519" in secret
            else None,
            tuple(mnemonic.split()) if mnemonic else None,
        )
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise UnreadableKeystore(f"{p}: malformed keystore secret ({type(e).__name__})") from e
    _check_public(p, keys, info)
    return keys, info


def _check_public(p: Path, keys: Keys, info: KeystoreInfo) -> None:
    if info.ed25519_public is not None and keys.ed25519_public != info.ed25519_public:
        raise UnreadableKeystore(f"{p}: the key does not match the recorded public key")
    if info.x25519_public is not None and keys.x25519_public != info.x25519_public:
        raise UnreadableKeystore(f"{p}: the X25519 key does not match its recorded public key")


def _hex32(text: Any) -> bytes:
    raw = bytes.fromhex(text)
    if len(raw) != 32:
        raise ValueError("a key is 32 bytes")
    return raw


# -- legacy: the wallet keystore (contracts.chain.wallet, format imago-keystore-1)


def _info_wallet1(p: Path, doc: dict[str, Any]) -> KeystoreInfo:
    try:
        return KeystoreInfo(
            path=p,
            format=LEGACY_WALLET,
            kind="wallet",
            name=str(doc.get("name") or p.stem),
            ed25519_public=_hex32(doc["public_key"]),
            x25519_public=None,
            encrypted="crypto" in doc,
            created_at=doc.get("created_at"),
            metadata={
                k: doc[k] for k in ("version", "network", "workchain", "address") if k in doc
            },
        )
    except (KeyError, TypeError, ValueError) as e:
        raise UnreadableKeystore(f"{p}: malformed keystore ({type(e).__name__})") from e


def _load_wallet1(
    p: Path, doc: dict[str, Any], passphrase: str | None
) -> tuple[Keys, KeystoreInfo]:
    info = _info_wallet1(p, doc)
    if "crypto" in doc:
        try:
            aad = json.dumps(
                {k: doc[k] for k in ("format", "address", "public_key", "network")},
                sort_keys=True,
            ).encode()
        except KeyError as e:
            raise UnreadableKeystore(f"{p}: malformed keystore (KeyError)") from e
        plain = _open_sealed(p, doc["crypto"], passphrase, aad, base64.b64decode)
        try:
            payload = json.loads(plain)
        except ValueError:
            raise UnreadableKeystore(f"{p}: the sealed secret is not JSON") from None
    else:
        payload = doc.get("secret")
    try:
        if "mnemonic" in payload:
            from pytoniq_core.crypto.keys import mnemonic_to_private_key

            words = tuple(payload["mnemonic"])
            _, private = mnemonic_to_private_key(list(words))
            keys = Keys(Ed25519PrivateKey.from_private_bytes(bytes(private)[:32]), None, words)
        else:
            seed = _hex32(payload["private_key"])
            keys = Keys(Ed25519PrivateKey.from_private_bytes(seed))
    except (KeyError, TypeError, ValueError) as e:
        raise UnreadableKeystore(f"{p}: malformed keystore secret ({type(e).__name__})") from e
    _check_public(p, keys, info)
    return keys, info


# -- legacy: the node keystore (node.keys, {"version": 1, "node_id": ...})

_NODE1_AAD = b"imago/v1/node-keystore"


def _info_node1(p: Path, doc: dict[str, Any]) -> KeystoreInfo:
    try:
        x = None
        if "secret" in doc:  # in clear: the X25519 public key can be derived
            secret = bytes.fromhex(doc["secret"])
            x = X25519PrivateKey.from_private_bytes(secret[32:]).public_key().public_bytes_raw()
        return KeystoreInfo(
            path=p,
            format=LEGACY_NODE,
            kind="node",
            name=p.stem,
            ed25519_public=_hex32(doc["node_id"]),
            x25519_public=x,
            encrypted="encryption" in doc,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise UnreadableKeystore(f"{p}: malformed keystore ({type(e).__name__})") from e


def _load_node1(p: Path, doc: dict[str, Any], passphrase: str | None) -> tuple[Keys, KeystoreInfo]:
    info = _info_node1(p, doc)
    if "encryption" in doc:
        secret = _open_sealed(p, doc["encryption"], passphrase, _NODE1_AAD)
    else:
        try:
            secret = bytes.fromhex(doc["secret"])
        except (KeyError, TypeError, ValueError) as e:
            raise UnreadableKeystore(f"{p}: malformed keystore ({type(e).__name__})") from e
    if len(secret) != 64:
        raise UnreadableKeystore(f"{p}: keystore holds malformed keys")
    keys = Keys(
        Ed25519PrivateKey.from_private_bytes(secret[:32]),
        X25519PrivateKey.from_private_bytes(secret[32:]),
    )
    _check_public(p, keys, info)
    return keys, info


# -- legacy: the spend key (client.keys, PKCS#8 PEM, encrypted by `cryptography`)


def _info_pem(p: Path, raw: bytes) -> KeystoreInfo:
    encrypted = b"ENCRYPTED" in raw.split(b"\n", 1)[0]
    public = None
    if not encrypted:
        public = _pem_key(p, raw, None).public_key().public_bytes_raw()
    return KeystoreInfo(
        path=p,
        format=LEGACY_PEM,
        kind="spend",
        name=p.stem,
        ed25519_public=public,
        x25519_public=None,
        encrypted=encrypted,
    )


def _pem_key(p: Path, raw: bytes, passphrase: str | None) -> Ed25519PrivateKey:
    encrypted = b"ENCRYPTED" in raw.split(b"\n", 1)[0]
    if encrypted and not passphrase:
        raise WrongPassphrase(f"{p} is encrypted: a passphrase is needed")
    try:
        key = serialization.load_pem_private_key(
            raw, passphrase.encode() if encrypted and passphrase else None
        )
    except (TypeError, ValueError):
        if encrypted:  # a wrong passphrase and a damaged file look alike here
            raise WrongPassphrase(f"wrong passphrase for {p} (or the file was altered)") from None
        raise UnreadableKeystore(f"{p}: corrupt PEM keystore") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise UnreadableKeystore(f"{p} does not hold an ed25519 key")
    return key


def _load_pem(p: Path, raw: bytes, passphrase: str | None) -> tuple[Keys, KeystoreInfo]:
    key = _pem_key(p, raw, passphrase)
    info = _info_pem(p, raw)
    if info.ed25519_public is None:
        info = KeystoreInfo(
            path=p,
            format=LEGACY_PEM,
            kind="spend",
            name=p.stem,
            ed25519_public=key.public_key().public_bytes_raw(),
            x25519_public=None,
            encrypted=True,
        )
    return Keys(key), info
