"""Shared plumbing of the on-chain commands of every party: the --chain and wallet
options, progress dots, one-line errors, JSON or human output, the deployment record
(``$IMAGO_HOME/deployment.json``) and role keys (``$IMAGO_HOME/keys/``, keystores of
``protocol.keystore``); paths come from ``protocol.home``.

The commands themselves live with their parties: ``devnet_cli`` and ``registry_cli`` here,
``imago provider`` in ``node``, ``imago escrow`` in ``client``, ``imago vault`` in
``marketplace``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pytoniq_core import Address

from protocol import home, keystore
from protocol.keystore import KeystoreError

from . import devnet as devnet_mod
from . import operations
from .addresses import Deployment
from .devnet import DevnetClient, DevnetError
from .toncenter import DEVNET_URL, ToncenterClient, ToncenterError, chain_url
from .transactions import Trace
from .units import UnitsError, format_address, parse_address
from .wallet import Wallet, WalletError


class CliError(Exception):
    """A user-facing failure: printed without a traceback, exit code 1."""


# ----------------------------------------------------------------- shared helpers


class Progress:
    """Dots on stderr while waiting for the chain: ``waiting for confirmation....  done``."""

    def __init__(self, label: str = "waiting for confirmation", stream: Any = None):
        self.label = label
        self.stream = stream or sys.stderr
        self.started = False

    def tick(self) -> None:
        if not self.started:
            self.stream.write(self.label)
            self.started = True
        self.stream.write(".")
        self.stream.flush()

    def __enter__(self) -> Progress:
        self.tick()
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if self.started:
            self.stream.write(" done\n" if exc_type is None else " failed\n")
            self.stream.flush()


def add_chain_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--chain",
        default=os.environ.get("IMAGO_CHAIN", "devnet"),
        help="devnet | testnet | mainnet | URL of a toncenter v2 API (default: devnet; "
        "API key from TONCENTER_API_KEY)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")


def add_wallet_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", default="default", help="wallet name (default: default)")
    p.add_argument(
        "--passphrase-env",
        metavar="VAR",
        help="environment variable holding the keystore passphrase",
    )


def chain_network(chain: str) -> str:
    """The network whose address format and wallet id a --chain value uses."""
    return chain if chain in ("devnet", "testnet", "mainnet") else "testnet"


def _devnet_url() -> str:
    st = devnet_mod.read_status()
    if st.running and st.url:
        return st.url
    return DEVNET_URL


def open_chain(args: argparse.Namespace) -> ToncenterClient:
    """The adapter for --chain (the devnet one also speaks /devnet/ endpoints)."""
    chain = args.chain
    api_key = os.environ.get("TONCENTER_API_KEY") or None
    if chain == "devnet":
        return DevnetClient(_devnet_url(), api_key=api_key)
    try:
        url = chain_url(chain)
    except ValueError as e:
        raise CliError(str(e)) from None
    if chain.startswith("http"):
        return DevnetClient(url, api_key=api_key)  # may be a devnet elsewhere
    return ToncenterClient(url, api_key=api_key, testnet=chain != "mainnet")


def wallet_file(name: str) -> Path:
    if not name or "/" in name or name.startswith("."):
        raise CliError(f"bad wallet name {name!r}")
    return home.wallet_file(name)


def wallet_passphrase(args: argparse.Namespace) -> str | None:
    var = getattr(args, "passphrase_env", None)
    if not var:
        return None
    value = os.environ.get(var)
    if value is None:
        raise CliError(f"--passphrase-env {var}: that environment variable is not set")
    return value


def open_wallet(args: argparse.Namespace, client: ToncenterClient) -> Wallet:
    path = wallet_file(args.name)
    if not path.exists():
        raise CliError(f"no wallet named {args.name!r} (create it with `imago wallet new`)")
    return Wallet.from_keystore(client, path, wallet_passphrase(args))


def run_async(coro: Coroutine[Any, Any, int]) -> int:
    """Run a handler; known failures become a one-line message and exit code 1."""
    try:
        return asyncio.run(coro)
    except (CliError, DevnetError, WalletError, KeystoreError, UnitsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ToncenterError as e:
        print(f"error: the chain API answered {e.code}: {e.message}", file=sys.stderr)
        return 1
    except TimeoutError as e:
        print(f"error: timed out: {e}", file=sys.stderr)
        return 1


def emit(args: argparse.Namespace, data: dict[str, Any], human: Callable[[], str]) -> None:
    if getattr(args, "json", False):
        print(json.dumps(data))
    else:
        print(human())


def trace_json(trace: Trace) -> dict[str, Any]:
    return {
        "transactions": [
            {
                "account": t.account,
                "lt": t.lt,
                "hash": base64.b64encode(t.hash).decode(),
                "gas_used": t.gas_used,
                "fee": t.fee,
                "exit_code": t.exit_code,
                "success": t.success,
                "aborted": t.aborted,
            }
            for t in trace
        ],
        "total_gas_used": trace.total_gas_used,
        "total_fees": trace.total_fees,
    }


# ----------------------------------------------------------------- deployment and keys


def load_deployment(required: bool = True) -> Deployment | None:
    path = home.deployment_file()
    if not path.exists():
        if required:
            raise CliError(f"no deployment at {path}: run `imago registry deploy --all` first")
        return None
    try:
        return Deployment.from_json(json.loads(path.read_text()))
    except (ValueError, KeyError) as e:
        raise CliError(f"{path} is not a deployment file: {e}") from None


def save_deployment(dep: Deployment) -> Path:
    path = home.deployment_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(dep.to_json(), indent=2) + "\n")
    tmp.replace(path)
    return path


def load_or_create_key(
    name: str, passphrase: str | None = None
) -> tuple[Ed25519PrivateKey, bytes, Path]:
    """A role key (e.g. ``operator``) in $IMAGO_HOME/keys/<name>.json, created on first
    use: a keystore (protocol.keystore, kind ``name``), encrypted at rest when a passphrase
    is given (--passphrase-env)."""
    path = home.key_file(name)
    keys, _ = keystore.load_or_create(path, passphrase, kind=name, name=name)
    return keys.ed25519, keys.ed25519_public, path


def hex32(text: str, what: str) -> bytes:
    try:
        raw = bytes.fromhex(text.removeprefix("0x"))
    except ValueError:
        raise CliError(f"{what} must be 32 bytes in hex") from None
    if len(raw) != 32:
        raise CliError(f"{what} must be 32 bytes in hex (got {len(raw)})")
    return raw


# ----------------------------------------------------------------- output helpers


def friendly(args: argparse.Namespace, a: Address | str) -> str:
    return format_address(a, testnet=chain_network(args.chain) != "mainnet")


def trace_summary(trace: Any) -> dict[str, Any]:
    return {
        "transactions": len(trace),
        "gas": trace.total_gas_used,
        "fees_nanoton": trace.total_fees,
        "exit_codes": operations.failed_exit_codes(trace),
    }


async def run_operation(label: str, coro_fn: Callable[..., Any], *a: Any, **kw: Any) -> Any:
    """Run one role operation with progress dots; OperationFailed becomes a CliError."""
    with Progress(label) as progress:
        try:
            return await coro_fn(*a, on_poll=progress.tick, **kw)
        except operations.OperationFailed as e:
            raise CliError(str(e)) from None


def registry_of(args: argparse.Namespace) -> Address:
    if getattr(args, "registry", None):
        return parse_address(args.registry)
    dep = load_deployment()
    assert dep is not None
    return Address(dep.registry)


def vault_of(args: argparse.Namespace) -> Address:
    if getattr(args, "vault", None):
        return parse_address(args.vault)
    dep = load_deployment()
    assert dep is not None
    if not dep.vaults:
        raise CliError("no vault in the deployment: give --vault or run `imago vault deploy`")
    return Address(next(iter(dep.vaults.values())))


def add_common_args(p: argparse.ArgumentParser, *, wallet: bool = True) -> None:
    add_chain_args(p)
    if wallet:
        add_wallet_args(p)
