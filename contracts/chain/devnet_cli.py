"""`imago devnet up|down|status` and `imago wallet new|show|balance|send|faucet`."""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import sys
from typing import Any

from pytoniq_core import Cell

from protocol.home import devnet_dir
from protocol.keystore import KeystoreError

from . import devnet as devnet_mod
from .cli import (
    CliError,
    Progress,
    add_chain_args,
    add_wallet_args,
    chain_network,
    emit,
    open_chain,
    open_wallet,
    run_async,
    trace_json,
    wallet_file,
    wallet_passphrase,
)
from .devnet import DevnetClient, DevnetError
from .toncenter import ToncenterError
from .transactions import Trace
from .units import format_address, format_ton, parse_address, parse_ton
from .wallet import WalletError, WalletKeys, create_keystore, read_keystore_header

DEFAULT_FAUCET_TON = "10"

# ----------------------------------------------------------------- devnet


def _cmd_devnet_up(args: argparse.Namespace) -> int:
    try:
        proc = devnet_mod.start_background(devnet_dir(), port=args.port)
    except DevnetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    data = {
        "running": True,
        "pid": proc.pid,
        "url": proc.url,
        "port": proc.port,
        "state_dir": str(proc.state_dir),
        "log_file": str(proc.log_file),
        "startup_seconds": round(proc.startup_seconds or 0.0, 3),
    }
    emit(
        args,
        data,
        lambda: (
            f"devnet up at {proc.url} (pid {proc.pid}, ready in "
            f"{data['startup_seconds']:.2f}s)\nstate: {proc.state_dir}\nlog:   {proc.log_file}"
        ),
    )
    return 0


def _cmd_devnet_down(args: argparse.Namespace) -> int:
    stopped = devnet_mod.stop_background(devnet_dir())
    emit(
        args,
        {"stopped": stopped},
        lambda: "devnet stopped (state kept)" if stopped else "no devnet was running",
    )
    return 0


def _cmd_devnet_status(args: argparse.Namespace) -> int:
    st = devnet_mod.read_status(devnet_dir())
    data: dict[str, Any] = {
        "running": st.running,
        "pid": st.pid,
        "url": st.url,
        "port": st.port,
        "state_dir": str(st.state_dir),
    }
    if st.running and st.url:

        async def probe() -> None:
            async with DevnetClient(st.url, max_retries=1, timeout=5) as c:
                info = await c.get_masterchain_info()
                health = await c.health()
                data["seqno"] = info.seqno
                data["transactions"] = health.get("transactions")
                data["now"] = health.get("now")
                data["clock_pinned"] = health.get("pinned")

        try:
            asyncio.run(probe())
        except ToncenterError as e:
            data["error"] = e.message

    def human() -> str:
        if not st.running:
            return f"devnet is not running (state dir {st.state_dir})"
        lines = [f"devnet running at {st.url} (pid {st.pid})"]
        if "seqno" in data:
            lines.append(f"masterchain seqno: {data['seqno']}")
            lines.append(f"transactions:      {data['transactions']}")
            pinned = " (pinned)" if data.get("clock_pinned") else ""
            lines.append(f"clock:             {data['now']}{pinned}")
        if "error" in data:
            lines.append(f"not answering: {data['error']}")
        lines.append(f"state: {st.state_dir}")
        return "\n".join(lines)

    emit(args, data, human)
    return 0 if st.running else 3


# ----------------------------------------------------------------- wallet


def _cmd_wallet_new(args: argparse.Namespace) -> int:
    try:
        path = wallet_file(args.name)
        network = chain_network(args.chain)
        keys = WalletKeys.generate(mnemonic=True)
        header = create_keystore(
            path, keys, passphrase=wallet_passphrase(args), network=network, name=args.name
        )
    except (CliError, KeystoreError, WalletError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    testnet = network != "mainnet"
    data = {
        "name": args.name,
        "file": str(path),
        "address": format_address(header["address"], testnet=testnet, bounceable=False),
        "address_raw": header["address"],
        "public_key": header["public_key"],
        "network": network,
        "encrypted": header["encrypted"],
    }
    emit(
        args,
        data,
        lambda: (
            f"wallet {args.name!r} created "
            f"({'encrypted' if data['encrypted'] else 'not encrypted'})\n"
            f"address: {data['address']}\nkeystore: {path} (mode 0600)\n"
            f"fund it on the devnet with: imago wallet faucet --name {args.name}"
        ),
    )
    return 0


def _cmd_wallet_show(args: argparse.Namespace) -> int:
    try:
        path = wallet_file(args.name)
        header = read_keystore_header(path)
    except (CliError, KeystoreError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    testnet = header.get("network") != "mainnet"
    addr = parse_address(header["address"])
    data = {
        "name": header.get("name", args.name),
        "file": str(path),
        "address": format_address(addr, testnet=testnet, bounceable=False),
        "address_bounceable": format_address(addr, testnet=testnet, bounceable=True),
        "address_raw": header["address"],
        "public_key": header["public_key"],
        "version": header.get("version"),
        "network": header.get("network"),
        "encrypted": header["encrypted"],
    }
    emit(
        args,
        data,
        lambda: "\n".join(
            [
                f"wallet {data['name']!r} ({data['version']}, {data['network']})",
                f"address:    {data['address']}",
                f"bounceable: {data['address_bounceable']}",
                f"raw:        {data['address_raw']}",
                f"public key: {data['public_key']}",
                f"keystore:   {path} ({'encrypted' if data['encrypted'] else 'not encrypted'})",
            ]
        ),
    )
    return 0


async def _wallet_balance(args: argparse.Namespace) -> int:
    async with open_chain(args) as client:
        header = read_keystore_header(wallet_file(args.name))
        addr = parse_address(header["address"])
        info = await client.get_address_information(addr)
    testnet = header.get("network") != "mainnet"
    data = {
        "name": args.name,
        "address": format_address(addr, testnet=testnet, bounceable=False),
        "balance_nanoton": info.balance,
        "balance": format_ton(info.balance, unit=False),
        "state": info.state,
    }
    emit(args, data, lambda: f"{format_ton(info.balance)} ({info.state}) {data['address']}")
    return 0


async def _wallet_faucet(args: argparse.Namespace) -> int:
    amount = parse_ton(args.amount)
    async with open_chain(args) as client:
        if not isinstance(client, DevnetClient) or args.chain in ("testnet", "mainnet"):
            raise CliError("the faucet exists only on the devnet (use a testnet faucet bot)")
        header = read_keystore_header(wallet_file(args.name))
        addr = parse_address(header["address"])
        with Progress("funding"):
            res = await client.faucet(addr, amount)
            balance = await client.get_balance(addr)
    data = {
        "name": args.name,
        "address": format_address(addr, testnet=True, bounceable=False),
        "amount_nanoton": res.amount,
        "amount": format_ton(res.amount, unit=False),
        "balance_nanoton": balance,
        "balance": format_ton(balance, unit=False),
        "tx_hash": base64.b64encode(res.hash).decode(),
        "tx_lt": res.lt,
    }
    emit(
        args,
        data,
        lambda: (
            f"sent {format_ton(res.amount)} to {data['address']}; balance {format_ton(balance)}"
        ),
    )
    return 0


async def _wallet_send(args: argparse.Namespace) -> int:
    amount = parse_ton(args.amount)
    dest = parse_address(args.destination)
    body: Cell | str | None = None
    if args.comment is not None and args.body_boc is not None:
        raise CliError("give either --comment or --body-boc, not both")
    if args.comment is not None:
        body = args.comment
    elif args.body_boc is not None:
        try:
            body = Cell.one_from_boc(base64.b64decode(args.body_boc))
        except Exception as e:
            raise CliError(f"--body-boc is not a base64 BOC: {e}") from None
    async with open_chain(args) as client:
        wallet = open_wallet(args, client)
        if args.no_wait:
            sent = await wallet.transfer(dest, amount, body, bounce=args.bounce, wait=False)
            data = {"sent": True, "hash_norm": base64.b64encode(sent.hash_norm).decode()}
            emit(args, data, lambda: f"sent; message hash {data['hash_norm']}")
            return 0
        with Progress() as progress:
            trace = await wallet.transfer(
                dest, amount, body, bounce=args.bounce, timeout=args.timeout, on_poll=progress.tick
            )
    assert isinstance(trace, Trace)
    data = {
        "from": wallet.friendly_address,
        "to": args.destination,
        "amount_nanoton": amount,
        "amount": format_ton(amount, unit=False),
        **trace_json(trace),
    }
    ok = trace.root.success

    def human() -> str:
        lines = [
            f"sent {format_ton(amount)} to {args.destination}: "
            + ("confirmed" if ok else "wallet transaction failed"),
            f"{len(trace)} transaction(s), gas {trace.total_gas_used}, "
            f"fees {format_ton(trace.total_fees)}",
        ]
        for t in trace.transactions[1:]:
            if t.bounced_out:
                lines.append(f"note: {t.account} bounced the value back")
        return "\n".join(lines)

    emit(args, data, human)
    return 0 if ok else 1


# ----------------------------------------------------------------- registration


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `devnet` and `wallet` to the `imago` parser."""
    dn = subparsers.add_parser("devnet", help="run the local TON devnet")
    dn_sub = dn.add_subparsers(dest="devnet_command", required=True, metavar="ACTION")

    up = dn_sub.add_parser("up", help="start the devnet in the background")
    up.add_argument(
        "--port",
        type=int,
        default=os.environ.get("IMAGO_DEVNET_PORT") or devnet_mod.DEFAULT_PORT,
        help=f"default {devnet_mod.DEFAULT_PORT}, or $IMAGO_DEVNET_PORT",
    )
    up.add_argument("--json", action="store_true")
    up.set_defaults(func=_cmd_devnet_up)

    down = dn_sub.add_parser("down", help="stop the devnet (its state is kept)")
    down.add_argument("--json", action="store_true")
    down.set_defaults(func=_cmd_devnet_down)

    status = dn_sub.add_parser("status", help="pid, URL and masterchain seqno")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=_cmd_devnet_status)

    w = subparsers.add_parser("wallet", help="wallets (v5r1) and their keystores")
    w_sub = w.add_subparsers(dest="wallet_command", required=True, metavar="ACTION")

    new = w_sub.add_parser("new", help="create a wallet keystore (mode 0600)")
    add_chain_args(new)
    add_wallet_args(new)
    new.set_defaults(func=_cmd_wallet_new)

    show = w_sub.add_parser("show", help="address and keystore details")
    show.add_argument("--json", action="store_true")
    add_wallet_args(show)
    show.set_defaults(func=_cmd_wallet_show)

    bal = w_sub.add_parser("balance", help="balance in TON")
    add_chain_args(bal)
    add_wallet_args(bal)
    bal.set_defaults(func=lambda a: run_async(_wallet_balance(a)))

    fau = w_sub.add_parser("faucet", help="fund the wallet from the devnet faucet")
    fau.add_argument("amount", nargs="?", default=DEFAULT_FAUCET_TON, help="TON (default 10)")
    add_chain_args(fau)
    add_wallet_args(fau)
    fau.set_defaults(func=lambda a: run_async(_wallet_faucet(a)))

    send = w_sub.add_parser("send", help="send TON (deploys the wallet on first use)")
    send.add_argument("destination", help="address (raw or user-friendly)")
    send.add_argument("amount", help="TON, e.g. 1.5")
    send.add_argument("--comment", help="text comment")
    send.add_argument("--body-boc", help="message body as a base64 BOC")
    send.add_argument(
        "--bounce",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bounceable message (default: as the address says)",
    )
    send.add_argument("--no-wait", action="store_true", help="do not wait for confirmation")
    send.add_argument("--timeout", type=float, default=60.0)
    add_chain_args(send)
    add_wallet_args(send)
    send.set_defaults(func=lambda a: run_async(_wallet_send(a)))
