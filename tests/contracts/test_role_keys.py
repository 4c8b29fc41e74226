"""Keys the role CLI keeps (operator, node, spend keys): 0600, encrypted with a passphrase."""

from __future__ import annotations

import json

import pytest

from contracts.chain import cli
from contracts.chain.wallet import create_keystore, load_keystore
from protocol.keystore import KeystoreError, WrongPassphrase


def test_role_keys_are_private_and_encrypted_with_a_passphrase(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("IMAGO_HOME", str(tmp_path))
    key, public, path = cli.load_or_create_key("operator", "correct horse")
    assert path.stat().st_mode & 0o777 == 0o600
    stored = json.loads(path.read_text())
    assert "crypto" in stored and key.private_bytes_raw().hex() not in path.read_text()
    again, public_again, _ = cli.load_or_create_key("operator", "correct horse")
    assert public_again == public == again.public_key().public_bytes_raw()
    with pytest.raises(WrongPassphrase):
        cli.load_or_create_key("operator", None)
    with pytest.raises(WrongPassphrase):
        cli.load_or_create_key("operator", "wrong")


def test_a_keystore_others_can_read_is_refused(tmp_path) -> None:
    path = tmp_path / "wallet.json"
    create_keystore(path)
    load_keystore(path)
    path.chmod(0o644)
    with pytest.raises(KeystoreError, match="chmod 600"):
        load_keystore(path)
