"""CLI subcommands of the matcher: ``imago matcher serve``."""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import os
import sys
from pathlib import Path

from protocol.home import logs_dir, matcher_dir

DEFAULT_LOG = Path("<imago-home>/logs/matcher.log")  # resolved when the command runs

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this party's subcommands to the `imago` parser."""
    matcher = subparsers.add_parser("matcher", help="the marketplace matcher")
    commands = matcher.add_subparsers(dest="matcher_command", required=True, metavar="COMMAND")
    serve = commands.add_parser("serve", help="run the matcher (routing, relay, metering)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8700)
    serve.add_argument("--database-url", help="SQLAlchemy URL (default: SQLite in the state dir)")
    serve.add_argument("--state-dir", type=Path, default=None, help="default $IMAGO_HOME/matcher")
    serve.add_argument(
        "--devnet", action="store_true", help="accept dev attestations (devnet only)"
    )
    serve.add_argument(
        "--allow-mr-td",
        nargs="+",
        action="extend",
        default=[],
        metavar="HEX",
        help="allowed TDX mr_td values (with --registry, not needed: its image allowlist "
        "decides, and these narrow it); without either, no TDX node is admitted",
    )
    serve.add_argument(
        "--accept-tcb-status", nargs="+", default=["UpToDate"], metavar="STATUS",
        help="TDX TCB statuses to accept (default: UpToDate)",
    )  # fmt: skip
    serve.add_argument("--vault", help="the operator's Vault address vouchers must name")
    serve.add_argument(
        "--chain", metavar="URL",
        help="toncenter v2 API (the devnet's, or toncenter): check escrows' spend keys on-chain",
    )  # fmt: skip
    serve.add_argument(
        "--global-id", type=int, metavar="ID",
        help="the network vouchers and receipts must name (mainnet -239, testnet -3; "
        "default: the --chain's, or the devnet's with --devnet)",
    )  # fmt: skip
    serve.add_argument(
        "--registry", metavar="ADDR",
        help="with --chain: admit only nodes whose Provider of this Registry is active, "
        "staked and bound to the attested key, whose image the Registry allows, and only "
        "for the models it allows",
    )  # fmt: skip
    serve.add_argument("--instance", help="this replica's name in the jobs table")
    serve.add_argument(
        "--ticket-key", type=Path, metavar="PATH",
        help="keystore of the key that signs node tickets, created if missing (default "
        "<state-dir>/ticket_key.json); replicas share one",
    )  # fmt: skip
    serve.add_argument(
        "--shutdown-grace", type=float, default=10.0, metavar="SECONDS",
        help="on SIGTERM, let relays finish this long, then abort them",
    )  # fmt: skip
    serve.add_argument(
        "--log-file", type=Path, nargs="?", const=DEFAULT_LOG, metavar="PATH",
        help="log to this file instead of stderr (alone: $IMAGO_HOME/logs/matcher.log)",
    )  # fmt: skip
    serve.add_argument("--log-level", default="INFO")
    settle = serve.add_argument_group(
        "settlement", "with --operator-wallet: build, commit and charge on its own"
    )
    settle.add_argument(
        "--operator-wallet", type=Path, metavar="PATH",
        help="the Vault operator's wallet keystore: it pays for commits and charges",
    )  # fmt: skip
    settle.add_argument(
        "--operator-key", type=Path, metavar="PATH",
        help="keystore of the Vault's operator key (signs commits and payout vouchers)",
    )  # fmt: skip
    settle.add_argument(
        "--passphrase-env", metavar="VAR", help="passphrase of both keystores, from this variable"
    )
    settle.add_argument(
        "--epoch-seconds", type=float, default=3600.0,
        help="length of an epoch (default 3600); a provider is paid at most this late",
    )  # fmt: skip
    settle.add_argument(
        "--charge-threshold", default="40", metavar="TON",
        help="charge an escrow once this much is committed and uncharged (default 40); "
        "a closing escrow is charged at once",
    )  # fmt: skip
    settle.add_argument(
        "--settle-every", type=float, default=10.0, metavar="SECONDS",
        help="how often settlement looks at the chain (default 10)",
    )  # fmt: skip
    serve.set_defaults(func=serve_command)


def serve_command(args: argparse.Namespace) -> int:
    import uvloop
    from aiohttp import web

    from marketplace.app import StartupRefused, create_app
    from marketplace.config import MatcherConfig
    from protocol.keystore import KeystoreError

    handlers: list[logging.Handler]
    if args.log_file is DEFAULT_LOG:
        args.log_file = logs_dir() / "matcher.log"
    if args.log_file:
        args.log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers = [logging.FileHandler(args.log_file)]
    else:
        handlers = [logging.StreamHandler()]
    logging.basicConfig(
        level=args.log_level.upper(),
        handlers=handlers,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("apscheduler").setLevel(logging.WARNING)  # a line per poll otherwise
    try:
        mr_td = frozenset(bytes.fromhex(h) for h in args.allow_mr_td)
    except ValueError:
        print("imago matcher: --allow-mr-td takes hex values", file=sys.stderr)
        return 2
    if args.registry and not args.chain:
        print("imago matcher: --registry needs --chain to read it", file=sys.stderr)
        return 2
    state_dir = (args.state_dir or matcher_dir()).expanduser()
    state_dir.mkdir(parents=True, exist_ok=True)
    extra: dict = {"instance": args.instance} if args.instance else {}
    if args.operator_wallet or args.operator_key:
        if not (args.operator_wallet and args.operator_key):
            print("imago matcher: settling needs --operator-wallet and --operator-key",
                  file=sys.stderr)  # fmt: skip
            return 2
        from contracts.chain.units import UnitsError, parse_ton
        from marketplace.config import SettlementConfig

        passphrase = os.environ.get(args.passphrase_env) if args.passphrase_env else None
        try:
            threshold = parse_ton(args.charge_threshold)
        except UnitsError as e:
            print(f"imago matcher: --charge-threshold: {e}", file=sys.stderr)
            return 2
        extra["settlement"] = SettlementConfig(
            operator_wallet=args.operator_wallet.expanduser(),
            operator_key=args.operator_key.expanduser(),
            passphrase=passphrase,
            epoch_s=args.epoch_seconds,
            charge_threshold=threshold,
            tick_s=args.settle_every,
            escrow_poll_s=max(args.settle_every, min(300.0, args.epoch_seconds / 4)),
        )
    config = MatcherConfig(
        state_dir=state_dir,
        database_url=args.database_url,
        devnet=args.devnet,
        allowed_mr_td=mr_td,
        accepted_tcb_statuses=frozenset(args.accept_tcb_status),
        vault=args.vault,
        global_id=args.global_id,
        chain_url=args.chain,
        registry=args.registry,
        ticket_key=args.ticket_key,
        **extra,
    )
    try:
        app = create_app(config)
    except KeystoreError as e:
        print(f"imago matcher: ticket key: {e}", file=sys.stderr)
        return 2
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())  # about a third less per hop
    try:
        web.run_app(
            app,
            host=args.host,
            port=args.port,
            access_log=None,
            handler_cancellation=True,
            shutdown_timeout=args.shutdown_grace,
            print=lambda *_: print(f"matcher listening on http://{args.host}:{args.port}"),
        )
    except StartupRefused as e:
        print(f"imago matcher: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            print(
                f"imago matcher: port {args.port} on {args.host} is taken; "
                "choose another with --port",
                file=sys.stderr,
            )
            return 1
        raise
    return 0
