"""Wallets: pytoniq's WalletV5R1 over the adapter, Imago's Wallet, keystores."""

from __future__ import annotations

import json
import os
import stat

import pytest
from pytoniq import WalletV5R1
from pytoniq_core import Address

from contracts.chain.results import ToncenterError
from contracts.chain.wallet import (
    ToncenterProvider,
    Wallet,
    WalletError,
    WalletKeys,
    create_keystore,
    load_keystore,
    read_keystore_header,
    wallet_address,
)
from protocol.keystore import KeystoreError, WrongPassphrase
from tests.chain.fixtures import TON, DevnetFixture, about


async def test_pytoniq_wallet_v5r1_over_the_adapter(devnet: DevnetFixture) -> None:
    provider = ToncenterProvider(devnet.chain)
    mnemonic, w = await WalletV5R1.create(provider, network_global_id=-3)
    assert not w.is_active
    await devnet.chain.faucet(w.address, 5 * TON)
    await w.update()
    assert w.balance == 5 * TON and w.is_uninitialized

    await w.deploy_via_external()
    await w.update()
    assert w.is_active
    assert await w.get_seqno() == 1
    assert w.seqno == 1  # from the account data the provider rebuilt

    dest = Address((0, os.urandom(32)))
    await w.transfer(dest.to_str(is_bounceable=False), TON // 2, body="from pytoniq")
    assert provider.last_sent is not None
    tx = await devnet.chain.wait_for_message(provider.last_sent, w.address, timeout=10)
    assert tx.success
    assert about(await devnet.chain.get_balance(dest), TON // 2)
    assert await w.get_seqno() == 2
    # the same keys give the same address in Imago's Wallet
    mine = Wallet(devnet.chain, WalletKeys.from_mnemonic(mnemonic))
    assert mine.address == w.address
    assert (await provider.get_account_state(w.address)).is_active()
    missing = Address((0, os.urandom(32)))
    assert await provider.raw_get_account_state(missing) == (None, None)


async def test_wallet_errors(devnet: DevnetFixture) -> None:
    w = Wallet(devnet.chain, WalletKeys.generate(mnemonic=False))
    with pytest.raises(WalletError, match="no balance"):
        await w.transfer(Address((0, os.urandom(32))), TON)
    assert await w.seqno() == 0 and await w.state() == "uninitialized"
    # first transfer deploys the wallet on the way
    await devnet.chain.faucet(w.address, 2 * TON)
    trace = await w.transfer(Address((0, os.urandom(32))), TON // 10, bounce=False)
    assert trace.root.success and await w.seqno() == 1
    # a message the wallet cannot accept (stale seqno) is a clear error
    boc = w.build_external([], seqno=0)
    with pytest.raises(ToncenterError):
        await devnet.chain.send_boc(boc)


def test_keystore_plain_mode_0600(tmp_path) -> None:
    path = tmp_path / "wallets" / "a.json"
    keys = WalletKeys.generate()
    header = create_keystore(path, keys)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert header["encrypted"] is False
    assert header["address"] == wallet_address(keys.public_key).to_str(is_user_friendly=False)
    loaded, h = load_keystore(path)
    assert loaded.private_key == keys.private_key and loaded.mnemonic == keys.mnemonic
    assert read_keystore_header(path)["public_key"] == keys.public_key.hex()
    with pytest.raises(KeystoreError, match="refusing to overwrite"):
        create_keystore(path, keys)


def test_keystore_encrypted_roundtrip(tmp_path) -> None:
    path = tmp_path / "enc.json"
    keys = WalletKeys.generate()
    create_keystore(path, keys, passphrase="correct horse")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    # encrypted at rest (single words could occur in base64 by chance; the list cannot)
    assert '"mnemonic"' not in text and json.dumps(list(keys.mnemonic)) not in text
    assert keys.private_key[:32].hex() not in text
    data = json.loads(text)
    assert data["crypto"]["kdf"] == "scrypt" and data["crypto"]["cipher"] == "chacha20-poly1305"
    loaded, header = load_keystore(path, "correct horse")
    assert loaded.private_key == keys.private_key and header["encrypted"] is True
    with pytest.raises(WrongPassphrase, match="wrong passphrase"):
        load_keystore(path, "wrong horse")
    with pytest.raises(WrongPassphrase, match="passphrase is needed"):
        load_keystore(path)
    # tampering with the public header breaks decryption too (it is authenticated)
    data["metadata"]["address"] = "0:" + "11" * 32
    path.write_text(json.dumps(data))
    with pytest.raises(WrongPassphrase):
        load_keystore(path, "correct horse")


def test_keys_from_seed_and_mnemonic() -> None:
    k = WalletKeys.from_seed(bytes(range(32)))
    assert len(k.private_key) == 64 and k.private_key[32:] == k.public_key
    assert WalletKeys.from_seed(k.private_key) == k
    with pytest.raises(WalletError):
        WalletKeys.from_mnemonic(["abandon"] * 24)
    with pytest.raises(WalletError):
        WalletKeys.from_seed(b"short")
