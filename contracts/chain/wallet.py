"""Wallets (v5r1) over the toncenter adapter, and their keystore files.

* :class:`ToncenterProvider` is the provider shim that lets pytoniq's wallet
  classes (``WalletV5R1`` and friends) run over :class:`ToncenterClient`: they need
  only ``raw_get_account_state``, ``get_account_state``, ``run_get_method`` and
  ``raw_send_message``.
* :class:`Wallet` is what Imago code uses: deploy, send internal messages, wait for
  the whole resulting chain of transactions, read the balance.
* Wallet keystores are :mod:`protocol.keystore` files of kind ``wallet`` (mode 0600,
  encrypted at rest with scrypt + ChaCha20-Poly1305 when a passphrase is given); the
  mnemonic is sealed with the key, the version, network and address are its metadata.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pytoniq.contract.contract import Contract
from pytoniq.contract.wallets.wallet_v5 import WALLET_V5_R1_CODE, WalletV5R1, WalletV5WalletID
from pytoniq.liteclient.client import RunGetMethodError
from pytoniq_core import Address, Cell
from pytoniq_core.crypto.keys import mnemonic_is_valid, mnemonic_new, mnemonic_to_private_key
from pytoniq_core.tlb.account import (
    Account,
    AccountState,
    AccountStorage,
    ShardAccount,
    SimpleAccount,
    StateInit,
    StorageExtraInfo,
    StorageInfo,
    StorageUsed,
)
from pytoniq_core.tlb.block import CurrencyCollection
from pytoniq_core.tlb.custom.wallet import WalletMessage, WalletV5R1Data

from protocol import keystore

from .results import AddressInfo, SentMessage
from .toncenter import ToncenterClient, ToncenterError
from .transactions import Trace

__all__ = [
    "MAINNET_GLOBAL_ID",
    "TESTNET_GLOBAL_ID",
    "OutMessage",
    "ToncenterProvider",
    "Wallet",
    "WalletError",
    "WalletKeys",
    "create_keystore",
    "load_keystore",
    "network_global_id",
]

TESTNET_GLOBAL_ID = -3  # devnet wallets use the testnet id: addresses match testnet ones
MAINNET_GLOBAL_ID = -239


class WalletError(Exception):
    """A wallet operation failed (not deployed, no funds, rejected message...)."""


def network_global_id(network: str) -> int:
    return MAINNET_GLOBAL_ID if network == "mainnet" else TESTNET_GLOBAL_ID


# ----------------------------------------------------------------- pytoniq provider shim


class ToncenterProvider:
    """The part of pytoniq's LiteClient interface that its wallet classes use."""

    def __init__(self, client: ToncenterClient):
        self.client = client
        self.last_sent: SentMessage | None = None

    async def raw_get_account_state(
        self, address: Address | str, block: Any = None
    ) -> tuple[Account | None, ShardAccount | None]:
        addr = address if isinstance(address, Address) else Address(address)
        info = await self.client.get_address_information(addr)
        if info.state == "uninitialized" and info.balance == 0 and info.last_transaction_lt == 0:
            return None, None  # account_none
        if info.state == "active":
            state = AccountState(
                "account_active", state_init=StateInit(code=info.code, data=info.data)
            )
        elif info.state == "frozen":
            state = AccountState("account_frozen", state_hash=(info.frozen_hash or bytes(32)).hex())
        else:
            state = AccountState("account_uninit")
        account = Account(
            addr=addr,
            storage_stat=StorageInfo(
                used=StorageUsed(0, 0),
                storage_extra=StorageExtraInfo("storage_extra_none"),
                last_paid=info.sync_utime,
                due_payment=None,
            ),
            storage=AccountStorage(
                last_trans_lt=info.last_transaction_lt,
                balance=CurrencyCollection(grams=info.balance, other=None),
                state=state,
            ),
        )
        shard = ShardAccount(
            account=account,
            last_trans_hash=info.last_transaction_hash,
            last_trans_lt=info.last_transaction_lt,
        )
        return account, shard

    async def get_account_state(self, address: Address | str) -> SimpleAccount:
        addr = address if isinstance(address, Address) else Address(address)
        return SimpleAccount.from_raw((await self.raw_get_account_state(addr))[0], addr)

    async def run_get_method(
        self, address: Address | str, method: str | int, stack: list[Any], block: Any = None
    ) -> list[Any]:
        res = await self.client.run_get_method(address, method, stack)
        if res.exit_code not in (0, 1):
            raise RunGetMethodError(address=address, method=method, exit_code=res.exit_code)
        return res.stack

    async def raw_send_message(self, message: bytes) -> int:
        self.last_sent = await self.client.send_boc_return_hash(message)
        return 1


# ----------------------------------------------------------------- keys and keystore


@dataclass(frozen=True)
class WalletKeys:
    """An ed25519 key pair; ``private_key`` is NaCl's 64-byte secret key (seed + public)."""

    private_key: bytes
    public_key: bytes
    mnemonic: tuple[str, ...] | None = None

    @classmethod
    def generate(cls, *, mnemonic: bool = True) -> WalletKeys:
        """New keys; from a fresh 24-word mnemonic (slow, ~0.1-1 s) or a random seed."""
        if mnemonic:
            return cls.from_mnemonic(mnemonic_new(24))
        return cls.from_seed(secrets.token_bytes(32))

    @classmethod
    def from_mnemonic(cls, words: Sequence[str] | str) -> WalletKeys:
        ws = words.split() if isinstance(words, str) else list(words)
        if not mnemonic_is_valid(ws):
            raise WalletError("invalid TON mnemonic (expected 24 valid words)")
        public, private = mnemonic_to_private_key(ws)
        return cls(private_key=bytes(private), public_key=bytes(public), mnemonic=tuple(ws))

    @classmethod
    def from_seed(cls, seed: bytes) -> WalletKeys:
        if len(seed) == 64:
            seed = seed[:32]
        if len(seed) != 32:
            raise WalletError("a private key is 32 bytes (seed) or 64 bytes (NaCl secret key)")
        public = Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes_raw()
        return cls(private_key=seed + public, public_key=public)

    def to_keys(self) -> keystore.Keys:
        """The same key for :mod:`protocol.keystore` (the mnemonic travels with it)."""
        return keystore.Keys(
            Ed25519PrivateKey.from_private_bytes(self.private_key[:32]), mnemonic=self.mnemonic
        )

    @classmethod
    def from_keys(cls, keys: keystore.Keys) -> WalletKeys:
        """The keystore keeps the seed beside the mnemonic: no slow re-derivation."""
        public = keys.ed25519_public
        return cls(private_key=keys.seed + public, public_key=public, mnemonic=keys.mnemonic)


def wallet_address(public_key: bytes, *, network: str = "devnet", workchain: int = 0) -> Address:
    """Address of the v5r1 wallet of a public key (subwallet 0)."""
    data = WalletV5R1.create_data_cell(
        public_key, wc=workchain, network_global_id=network_global_id(network)
    )
    return Address((workchain, StateInit(code=WALLET_V5_R1_CODE, data=data).serialize().hash))


def create_keystore(
    path: str | Path,
    keys: WalletKeys | None = None,
    *,
    passphrase: str | None = None,
    network: str = "devnet",
    name: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write a wallet keystore (:mod:`protocol.keystore`, kind ``wallet``; mode 0600,
    encrypted when a passphrase is given). The wallet's version, network, workchain and
    address are its public metadata; the mnemonic, if any, is sealed with the key.
    Returns :func:`read_keystore_header`'s view of it."""
    keys = keys or WalletKeys.generate()
    address = wallet_address(keys.public_key, network=network)
    info = keystore.save(
        path,
        keys.to_keys(),
        kind="wallet",
        name=name,
        metadata={
            "version": "v5r1",
            "network": network,
            "workchain": 0,
            "address": address.to_str(is_user_friendly=False),
        },
        passphrase=passphrase,
        overwrite=overwrite,
    )
    return _header(info)


def _header(info: keystore.KeystoreInfo) -> dict[str, Any]:
    """A wallet keystore's public part, flat: name, version, network, workchain, address,
    public_key, created_at, encrypted, format. The address is checked against the key."""
    meta = info.metadata
    if "address" not in meta or info.ed25519_public is None:
        raise keystore.UnreadableKeystore(f"{info.path} is not a wallet keystore ({info.kind})")
    try:
        network = str(meta.get("network", "devnet"))
        workchain = int(meta.get("workchain", 0))
        expected = wallet_address(info.ed25519_public, network=network, workchain=workchain)
        matches = Address(meta["address"]) == expected
    except Exception as e:  # a malformed address or workchain
        raise keystore.UnreadableKeystore(f"{info.path}: malformed wallet metadata: {e}") from e
    if not matches:
        raise keystore.UnreadableKeystore(
            f"{info.path}: the recorded address is not the wallet of its key"
        )
    return {
        "format": info.format,
        "name": info.name,
        "version": meta.get("version", "v5r1"),
        "network": network,
        "workchain": workchain,
        "address": expected.to_str(is_user_friendly=False),
        "public_key": info.ed25519_public.hex(),
        "created_at": info.created_at,
        "encrypted": info.encrypted,
    }


def read_keystore_header(path: str | Path) -> dict[str, Any]:
    """The public part of a wallet keystore (no passphrase needed), plus ``encrypted``."""
    return _header(keystore.read_info(path))


def load_keystore(
    path: str | Path, passphrase: str | None = None
) -> tuple[WalletKeys, dict[str, Any]]:
    """A wallet's keys and header; raises :class:`protocol.keystore.WrongPassphrase`,
    :class:`~protocol.keystore.UnreadableKeystore` or
    :class:`~protocol.keystore.InsecureKeystore` (all KeystoreError)."""
    keys, info = keystore.load(path, passphrase)
    return WalletKeys.from_keys(keys), _header(info)


# ----------------------------------------------------------------- the wallet


@dataclass(frozen=True)
class OutMessage:
    """One internal message for a wallet to send."""

    destination: Address | str
    value: int
    body: Cell | str | None = None
    state_init: StateInit | None = None
    bounce: bool | None = None  # default: bounceable unless the address says otherwise
    send_mode: int = 3  # pay fees separately, ignore action errors

    def to_wallet_message(self) -> WalletMessage:
        dest = (
            self.destination if isinstance(self.destination, Address) else Address(self.destination)
        )
        bounce = self.bounce
        if bounce is None:
            bounce = dest.is_bounceable if self.state_init is None else False
        return WalletV5R1.create_wallet_internal_message(
            destination=dest,
            send_mode=self.send_mode,
            value=self.value,
            body=self.body if self.body is not None else Cell.empty(),
            state_init=self.state_init,
            bounce=bounce,
        )


def _valid_until(chain_now: int, ttl: int = 120) -> int:
    """Expiry for a signed transfer: from wall time, or from chain time if that is ahead
    (a devnet whose clock was moved forward)."""
    return max(int(time.time()), chain_now) + ttl


class Wallet:
    """A wallet v5r1 (subwallet 0) driven through the toncenter adapter."""

    def __init__(
        self,
        client: ToncenterClient,
        keys: WalletKeys,
        *,
        network: str = "devnet",
        workchain: int = 0,
    ):
        self.client = client
        self.keys = keys
        self.network = network
        self.workchain = workchain
        self.global_id = network_global_id(network)
        self.wallet_id = WalletV5WalletID(
            network_global_id=self.global_id, workchain=workchain
        ).pack()
        data = WalletV5R1.create_data_cell(keys.public_key, wc=workchain, wallet_id=self.wallet_id)
        self.state_init = StateInit(code=WALLET_V5_R1_CODE, data=data)
        self.address = Address((workchain, self.state_init.serialize().hash))
        self.provider = ToncenterProvider(client)
        # a throw-away pytoniq object, used only to sign (no network access)
        self._signer = WalletV5R1(
            provider=self.provider, address=self.address, private_key=keys.private_key
        )
        self._seqno: int | None = None

    @classmethod
    def from_keystore(
        cls, client: ToncenterClient, path: str | Path, passphrase: str | None = None
    ) -> Wallet:
        keys, header = load_keystore(path, passphrase)
        return cls(client, keys, network=header.get("network", "devnet"))

    @property
    def testnet(self) -> bool:
        return self.network != "mainnet"

    @property
    def friendly_address(self) -> str:
        """Non-bounceable form: the right one to fund a wallet that may not exist yet."""
        return self.address.to_str(is_bounceable=False, is_test_only=self.testnet)

    async def pytoniq(self) -> WalletV5R1:
        """pytoniq's WalletV5R1 for this wallet, running over the adapter."""
        return await WalletV5R1.from_private_key(
            self.provider,
            self.keys.private_key,
            wc=self.workchain,
            wallet_id=self.wallet_id,
        )

    async def balance(self) -> int:
        return await self.client.get_balance(self.address)

    async def state(self) -> str:
        return (await self.client.get_address_information(self.address)).state

    async def seqno(self) -> int:
        """Current seqno (0 if not deployed)."""
        info = await self.client.get_address_information(self.address)
        if info.state != "active":
            return 0
        res = await self.client.run_get_method(self.address, "seqno")
        if not res.ok:
            raise WalletError(f"seqno get-method failed with exit code {res.exit_code}")
        return res.int(0)

    def build_external(
        self,
        messages: Sequence[OutMessage],
        *,
        seqno: int,
        deploy: bool = False,
        valid_until: int | None = None,
    ) -> bytes:
        """Sign a transfer (up to 255 messages) into an external message BOC.

        ``deploy`` attaches the StateInit (first message of a fresh wallet).
        """
        if valid_until is None:
            valid_until = int(time.time()) + 120
        body = self._signer.raw_create_transfer_msg(
            private_key=self.keys.private_key,
            seqno=seqno,
            wallet_id=self.wallet_id,
            messages=[m.to_wallet_message() for m in messages],
            valid_until=valid_until,
        )
        ext = Contract.create_external_msg(
            dest=self.address, state_init=self.state_init if deploy else None, body=body
        )
        return ext.serialize().to_boc()

    async def send(
        self,
        messages: OutMessage | Sequence[OutMessage],
        *,
        wait: bool = True,
        timeout: float = 60.0,
        on_poll: Callable[[], None] | None = None,
    ) -> Trace | SentMessage:
        """Send internal message(s); with ``wait`` return the whole resulting Trace.

        Deploys the wallet on the way if it is not deployed yet (it needs a balance).
        """
        msgs = [messages] if isinstance(messages, OutMessage) else list(messages)
        info = await self.client.get_address_information(self.address)
        if info.balance == 0:
            raise WalletError(
                f"wallet {self.friendly_address} has no balance: fund it first "
                "(on the devnet: imago wallet faucet)"
            )
        deploy = info.state != "active"
        if info.state == "frozen":
            raise WalletError(f"wallet {self.friendly_address} is frozen")
        seqno = 0 if deploy else await self._seqno_of(info)
        boc = self.build_external(
            msgs, seqno=seqno, deploy=deploy, valid_until=_valid_until(info.sync_utime)
        )
        try:
            sent = await self.client.send_boc_return_hash(boc)
        except ToncenterError as e:
            raise WalletError(f"the wallet rejected the transfer: {e.message}") from e
        if not wait:
            return sent
        root = await self.client.wait_for_message(
            sent, self.address, after_lt=info.last_transaction_lt, timeout=timeout, on_poll=on_poll
        )
        return await self.client.wait_for_trace(root, timeout=timeout, on_poll=on_poll)

    async def transfer(
        self,
        destination: Address | str,
        value: int,
        body: Cell | str | None = None,
        *,
        state_init: StateInit | None = None,
        bounce: bool | None = None,
        wait: bool = True,
        timeout: float = 60.0,
        on_poll: Callable[[], None] | None = None,
    ) -> Trace | SentMessage:
        """Send one internal message (see :meth:`send`)."""
        return await self.send(
            OutMessage(destination, value, body, state_init, bounce),
            wait=wait,
            timeout=timeout,
            on_poll=on_poll,
        )

    async def deploy(
        self, *, timeout: float = 60.0, on_poll: Callable[[], None] | None = None
    ) -> Trace | None:
        """Deploy the wallet with an empty transfer; None if it is already active."""
        info = await self.client.get_address_information(self.address)
        if info.state == "active":
            return None
        if info.balance == 0:
            raise WalletError(f"wallet {self.friendly_address} has no balance to deploy with")
        boc = self.build_external(
            [], seqno=0, deploy=True, valid_until=_valid_until(info.sync_utime)
        )
        sent = await self.client.send_boc_return_hash(boc)
        root = await self.client.wait_for_message(
            sent, self.address, after_lt=info.last_transaction_lt, timeout=timeout, on_poll=on_poll
        )
        return await self.client.wait_for_trace(root, timeout=timeout, on_poll=on_poll)

    async def _seqno_of(self, info: AddressInfo) -> int:
        """Seqno from the account data we already have (a get-method call as fallback)."""
        if info.data is not None:
            try:
                return WalletV5R1Data.deserialize(info.data.begin_parse()).seqno
            except Exception:  # not v5r1 data: ask the contract
                pass
        res = await self.client.run_get_method(self.address, "seqno")
        if not res.ok:
            raise WalletError(f"seqno get-method failed with exit code {res.exit_code}")
        return res.int(0)


__all__ += ["read_keystore_header", "wallet_address"]
