"""protocol.keystore: one format for every key; the three earlier formats still read."""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import pytest

from client.keys import load_spend_key, spend_public_key
from contracts.chain.wallet import load_keystore, read_keystore_header
from node.keys import load_or_create_keys, node_public_key
from protocol import keystore
from protocol.keystore import (
    InsecureKeystore,
    Keys,
    KeystoreError,
    KeystoreExists,
    UnreadableKeystore,
    WrongPassphrase,
)

LEGACY = Path(__file__).parent / "legacy_keystores"
EXPECTED = json.loads((LEGACY / "expected.json").read_text())
PW = "correct horse"


def legacy(tmp_path: Path, name: str) -> Path:
    """A copy of a legacy fixture, 0600 (git keeps 0644)."""
    path = tmp_path / name
    shutil.copyfile(LEGACY / name, path)
    path.chmod(0o600)
    return path


# ----------------------------------------------------------------- this format


def test_plain_roundtrip_is_0600_and_public_part_readable(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "k.json"
    keys = Keys.generate(x25519=True)
    info = keystore.save(path, keys, kind="node", metadata={"note": "n"})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert not info.encrypted and info.kind == "node" and info.format == keystore.FORMAT
    loaded, info2 = keystore.load(path)
    assert loaded.seed == keys.seed and loaded.x25519_public == keys.x25519_public
    assert info2 == info and info2.metadata == {"note": "n"}
    public = keystore.read_info(path)
    assert (public.ed25519_public, public.x25519_public) == (
        keys.ed25519_public,
        keys.x25519_public,
    )
    assert keys.seed.hex() not in repr(keys) and keys.ed25519_public.hex() in repr(keys)
    with pytest.raises(KeystoreExists):
        keystore.save(path, Keys.generate(), kind="node")
    keystore.save(path, Keys.generate(), kind="node", overwrite=True)
    assert keystore.load(path)[0].seed != keys.seed


def test_encrypted_at_rest_and_one_error_for_a_wrong_passphrase(tmp_path: Path) -> None:
    path = tmp_path / "k.json"
    keys = Keys(Keys.generate().ed25519, mnemonic=("abandon",) * 24)
    keystore.save(path, keys, kind="wallet", passphrase=PW)
    text = path.read_text()
    doc = json.loads(text)
    assert "secret" not in doc and keys.seed.hex() not in text and "abandon" not in text
    assert doc["crypto"]["kdf"] == "scrypt" and doc["crypto"]["cipher"] == "chacha20-poly1305"
    assert keystore.read_info(path).encrypted
    loaded, _ = keystore.load(path, PW)
    assert loaded.seed == keys.seed and loaded.mnemonic == keys.mnemonic
    for wrong in ("battery staple", None, ""):
        with pytest.raises(WrongPassphrase):
            keystore.load(path, wrong)
    # the public part is authenticated: altering it is caught like a wrong passphrase
    doc["metadata"] = {"address": "elsewhere"}
    path.write_text(json.dumps(doc))
    with pytest.raises(WrongPassphrase):
        keystore.load(path, PW)


def test_a_passphrase_for_a_file_in_clear_is_not_needed(tmp_path: Path) -> None:
    path = tmp_path / "k.json"
    keys, info = keystore.load_or_create(path, kind="spend")
    again, info = keystore.load(path, "unused")
    assert again.seed == keys.seed and not info.encrypted


def test_one_error_for_a_corrupt_or_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "k.json"
    keystore.save(path, Keys.generate(), kind="spend")
    doc = json.loads(path.read_text())
    cases = {
        "missing": None,
        "not json": "{nope",
        "not a keystore": json.dumps({"hello": 1}),
        "no secret": json.dumps({k: v for k, v in doc.items() if k != "secret"}),
        "another key": json.dumps({**doc, "public": {"ed25519": "11" * 32}}),
        "short key": json.dumps({**doc, "secret": {"ed25519": "11" * 31}}),
        "bad scrypt": json.dumps(
            {**{k: v for k, v in doc.items() if k != "secret"}, "crypto": {"kdf": "scrypt"}}
        ),
    }
    for case, content in cases.items():
        target = tmp_path / f"{case}.json"
        if content is not None:
            target.write_text(content)
            target.chmod(0o600)
        with pytest.raises(UnreadableKeystore):
            keystore.load(target, PW)
        assert issubclass(UnreadableKeystore, KeystoreError), case


def test_a_keystore_others_can_read_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "k.json"
    keystore.save(path, Keys.generate(), kind="operator")
    for mode in (0o644, 0o640, 0o604, 0o660):
        path.chmod(mode)
        with pytest.raises(InsecureKeystore, match="chmod 600"):
            keystore.load(path)
    path.chmod(0o600)
    keystore.load(path)


def test_load_or_create_agrees_under_a_race(tmp_path: Path) -> None:
    """Two creators at once (two matcher replicas and one ticket key): one key wins."""
    import threading

    path = tmp_path / "ticket.json"
    results: list[bytes] = []

    def create() -> None:
        results.append(keystore.load_or_create(path, kind="ticket")[0].ed25519_public)

    threads = [threading.Thread(target=create) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and len(results) == 8
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


# ----------------------------------------------------------------- legacy formats


@pytest.mark.parametrize("name", ["wallet-plain.json", "wallet-encrypted.json"])
def test_legacy_wallet_keystore(tmp_path: Path, name: str) -> None:
    path = legacy(tmp_path, name)
    want = EXPECTED[name]
    header = read_keystore_header(path)
    assert header["address"] == want["address"] and header["public_key"] == want["ed25519"]
    assert header["encrypted"] == ("passphrase" in want)
    keys, _ = load_keystore(path, want.get("passphrase"))
    assert keys.public_key.hex() == want["ed25519"] and list(keys.mnemonic) == want["mnemonic"]
    if "passphrase" in want:
        with pytest.raises(WrongPassphrase):
            load_keystore(path, "battery staple")
        with pytest.raises(WrongPassphrase):
            load_keystore(path)


@pytest.mark.parametrize("name", ["operator.json", "operator-encrypted.json"])
def test_legacy_role_key(tmp_path: Path, name: str) -> None:
    """Role keys (operator, node-N, spend-..., the ticket key) were wallet keystores."""
    path = legacy(tmp_path, name)
    want = EXPECTED[name]
    keys, info = keystore.load(path, want.get("passphrase"))
    assert keys.ed25519_public.hex() == want["ed25519"] and info.legacy
    assert keystore.read_info(path).ed25519_public.hex() == want["ed25519"]


@pytest.mark.parametrize("name", ["node-plain.json", "node-encrypted.json"])
def test_legacy_node_keystore(tmp_path: Path, name: str) -> None:
    path = legacy(tmp_path, name)
    want = EXPECTED[name]
    assert node_public_key(path).hex() == want["ed25519"]  # no passphrase needed
    keys = load_or_create_keys(path, want.get("passphrase"))
    assert keys.ed25519_public.hex() == want["ed25519"]
    assert keys.x25519_public.hex() == want["x25519"]
    if "passphrase" in want:
        with pytest.raises(WrongPassphrase):
            load_or_create_keys(path, "battery staple")
        with pytest.raises(WrongPassphrase):
            load_or_create_keys(path)
    path.chmod(0o644)
    with pytest.raises(InsecureKeystore):
        load_or_create_keys(path, want.get("passphrase"))


@pytest.mark.parametrize("name", ["spend-plain.key", "spend-encrypted.key"])
def test_legacy_spend_key(tmp_path: Path, name: str) -> None:
    path = legacy(tmp_path, name)
    want = EXPECTED[name]
    key = load_spend_key(path, want.get("passphrase"))
    assert key.public_key().public_bytes_raw().hex() == want["ed25519"]
    assert spend_public_key(path, want.get("passphrase")).hex() == want["ed25519"]
    if "passphrase" in want:
        assert keystore.read_info(path).ed25519_public is None  # the old PEM seals it too
        with pytest.raises(WrongPassphrase):
            load_spend_key(path, "battery staple")
        with pytest.raises(WrongPassphrase):
            load_spend_key(path)


def test_legacy_files_are_read_not_rewritten(tmp_path: Path) -> None:
    for name in EXPECTED:
        path = legacy(tmp_path, name)
        before = path.read_bytes()
        keystore.load(path, EXPECTED[name].get("passphrase"))
        assert path.read_bytes() == before
