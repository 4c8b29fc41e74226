"""Client subcommands: ``imago gateway`` (the local gateway) and ``imago chat``.

Defaults come from ``$IMAGO_HOME/stack.json`` (written by ``imago up``; IMAGO_HOME
defaults to ``~/.imago``) when it exists: ``matcher_url``, ``gateway_url``, ``escrow``,
``vault``, ``model``, and optionally ``devnet``, ``chain_url``, ``registry``,
``max_price_prompt``, ``max_price_completion``, ``api_key``, ``tdx_measurements`` (hex
list). Flags override. Without a stack, the gateway pays from the escrow that `imago
escrow open` recorded for its spend key (``<state dir>/escrow.json``).

With a chain, ``imago gateway`` reads its escrow there before it serves, and refuses to
start (exit 2) unless the escrow is deployed, pays the given vault and names this
gateway's spend key: the matcher would refuse every voucher otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any

from protocol.home import client_dir, escrow_record, spend_key_file, stack_file

__all__ = ["register"]

DEFAULT_MATCHER = "http://127.0.0.1:8700"
DEFAULT_GATEWAY = "http://127.0.0.1:8900/v1"
DEFAULT_PORT = 8900
DEFAULT_CAP = 1_000_000_000  # nanoTON per million tokens: 1 TON


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        print(f"warning: ignoring unreadable {path}: {e}", file=sys.stderr)
        return {}
    return data if isinstance(data, dict) else {}


def load_stack_config() -> dict[str, Any]:
    return _read_json(stack_file())


def load_escrow_record(state_dir: Path, spend_public: bytes) -> dict[str, Any]:
    """The escrow `imago escrow open` made for this spend key, if it recorded one."""
    record = _read_json(escrow_record(state_dir))
    return record if record.get("spend_key") == spend_public.hex() else {}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``gateway`` and ``chat`` to the `imago` parser."""
    serve = subparsers.add_parser("gateway", help="run the OpenAI-compatible gateway on loopback")
    serve.add_argument("--host", default="127.0.0.1", help="listen address (default loopback)")
    serve.add_argument("--port", type=int, default=None, help=f"default {DEFAULT_PORT}")
    serve.add_argument("--matcher", help=f"matcher URL (default {DEFAULT_MATCHER})")
    serve.add_argument(
        "--escrow",
        help="your Escrow contract address (default: the stack's, or the one `imago escrow "
        "open` made for this gateway's spend key)",
    )
    serve.add_argument("--vault", help="the matcher's Vault contract address (default: idem)")
    serve.add_argument(
        "--devnet", action="store_true", default=None, help="accept dev attestations"
    )
    serve.add_argument(
        "--chain", help="toncenter v2 API of the chain (default: the stack's devnet, if any)"
    )
    serve.add_argument(
        "--global-id",
        type=int,
        help="the network's global id, which vouchers and receipts name (mainnet -239, "
        "testnet -3; default: read from --chain, or the devnet's with --devnet)",
    )
    serve.add_argument(
        "--registry",
        help="the Registry whose image allowlist nodes must be on (default: the stack's)",
    )
    serve.add_argument("--state-dir", type=Path, help="default $IMAGO_HOME/client")
    serve.add_argument("--api-key", help="require this bearer key from local apps")
    serve.add_argument(
        "--tdx-measurement",
        action="append",
        default=None,
        metavar="HEX",
        help="an allowed TDX mr_td (repeatable; default from stack.json); with a Registry, "
        "a node's image must be on both",
    )
    serve.add_argument(
        "--max-price-prompt",
        type=int,
        help="nanoTON per million tokens; a request may only lower it",
    )
    serve.add_argument(
        "--max-price-completion",
        type=int,
        help="nanoTON per million tokens; a request may only lower it",
    )
    serve.add_argument(
        "--allow-origin",
        action="append",
        default=None,
        metavar="ORIGIN",
        help="let web pages of this origin (scheme://host[:port]) call the gateway, with "
        "CORS (repeatable); by default a request with an Origin header is refused",
    )
    serve.set_defaults(func=cmd_serve)

    chat = subparsers.add_parser("chat", help="ask one question through the gateway")
    chat.add_argument("question")
    chat.add_argument("--model", help="default: the stack's model, or the first listed")
    chat.add_argument("--gateway", help=f"gateway base URL (default {DEFAULT_GATEWAY})")
    chat.add_argument(
        "--stream", action=argparse.BooleanOptionalAction, default=True, help="stream the answer"
    )
    chat.add_argument("--max-tokens", type=int, default=256)
    chat.add_argument(
        "--temperature", type=float, default=0.0, help="0 (the default) answers deterministically"
    )
    chat.add_argument("--api-key", help="the gateway's key, if it requires one")
    chat.set_defaults(func=cmd_chat)


# -- serve -----------------------------------------------------------------------------


def _devnet_placeholder(label: str, seed: bytes) -> str:
    return "0:" + hashlib.sha256(b"imago-devnet-" + label.encode() + seed).hexdigest()


def cmd_serve(args: argparse.Namespace) -> int:
    import uvloop
    from aiohttp import web
    from pytoniq_core import Address

    from client.gateway import create_app, is_loopback_name, normalize_origin
    from client.keys import PASSPHRASE_ENV, load_or_create_spend_key
    from client.sdk import ImagoClient, LedgerError, PriceCaps
    from contracts.chain.allowlists import Allowlists
    from contracts.chain.devnet import is_devnet
    from contracts.chain.toncenter import ToncenterClient
    from protocol.attestation import AttestationPolicy
    from protocol.keystore import KeystoreError

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    config = load_stack_config()
    devnet = bool(args.devnet if args.devnet is not None else config.get("devnet", False))
    state_dir = Path(args.state_dir or client_dir()).expanduser()
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        spend_key = load_or_create_spend_key(
            spend_key_file(state_dir), os.environ.get(PASSPHRASE_ENV) or None
        )
    except KeystoreError as e:
        return _fail(str(e))
    spend_public = spend_key.public_key().public_bytes_raw()
    try:
        origins = [normalize_origin(o) for o in args.allow_origin or []]
    except ValueError as e:
        return _fail(f"--allow-origin: {e}")
    chain = args.chain or config.get("chain_url") or None
    registry = args.registry or config.get("registry") or None
    if registry and not chain:
        return _fail("--registry needs --chain to read it")
    if devnet and chain and not asyncio.run(is_devnet(chain)):
        return _fail(
            f"--devnet accepts dev attestations, which only the Imago devnet may; the chain "
            f"at {chain} is not one"
        )
    recorded = load_escrow_record(state_dir, spend_public)
    escrow = args.escrow or config.get("escrow") or recorded.get("escrow")
    vault = args.vault or config.get("vault") or recorded.get("vault")
    if not escrow or not vault:
        # With a chain, a placeholder escrow could only be refused (it is not deployed).
        if not devnet or chain:
            return _fail(
                "give --escrow and --vault (or open an escrow with `imago escrow open`, or "
                "run `imago up`: both record them)"
            )
        escrow = escrow or _devnet_placeholder("escrow", spend_public)
        vault = vault or _devnet_placeholder("vault", b"")
        print(f"devnet: placeholder escrow {escrow} and vault {vault}", file=sys.stderr)
    try:
        escrow_raw = Address(escrow).to_str(is_user_friendly=False)
        Address(vault)
    except Exception as e:
        return _fail(f"not a TON address: {e}")
    caps = PriceCaps(
        prompt=_first_int(args.max_price_prompt, config.get("max_price_prompt"), DEFAULT_CAP),
        completion=_first_int(
            args.max_price_completion, config.get("max_price_completion"), DEFAULT_CAP
        ),
    )
    try:
        measurements = frozenset(
            bytes.fromhex(m) for m in (args.tdx_measurement or config.get("tdx_measurements", []))
        )
    except ValueError as e:
        return _fail(f"a TDX measurement is hex: {e}")
    global_id = args.global_id
    if chain:
        refusal = asyncio.run(_check_escrow(chain, escrow, vault, spend_public))
        if refusal:
            return _fail(refusal)
        try:
            on_chain = asyncio.run(_chain_global_id(chain))
        except Exception as e:  # transport or API error: say which chain
            return _fail(f"cannot read the network's global id from the chain at {chain}: {e}")
        if global_id is not None and global_id != on_chain:
            return _fail(f"--global-id {global_id}: the chain at {chain} is network {on_chain}")
        global_id = on_chain
    allowlists = Allowlists(ToncenterClient(chain), registry) if registry else None
    policy = AttestationPolicy(
        allow_dev=devnet,
        # With the Registry and no list of our own, the Registry alone names TDX images.
        allowed_measurements=None if allowlists and not measurements else measurements,
    )
    ledger = state_dir / f"spend-{hashlib.sha256(escrow_raw.encode()).hexdigest()[:16]}.json"
    matcher = args.matcher or config.get("matcher_url") or DEFAULT_MATCHER
    try:
        client = ImagoClient(
            matcher_url=matcher,
            escrow=escrow,
            vault=vault,
            spend_key=spend_key,
            policy=policy,
            caps=caps,
            state_path=ledger,
            devnet=devnet,
            allowlists=allowlists,
            global_id=global_id,
        )
    except (LedgerError, ValueError) as e:
        return _fail(str(e))
    api_key = args.api_key or os.environ.get("IMAGO_API_KEY") or None
    loopback = is_loopback_name(args.host)
    if api_key is None and not loopback:
        # Whoever reaches the gateway spends from the escrow.
        return _fail(f"--host {args.host} is reachable from other machines: set --api-key")
    port = args.port if args.port is not None else _port_from(config.get("gateway_url"))
    sock = _bind(args.host, port)
    if sock is None:
        return _fail(f"port {port} on {args.host} is taken; choose another with --port")

    def announce(_: str) -> None:
        print(
            f"Imago gateway on http://{args.host}:{port}/v1 → matcher {matcher}\n"
            f"  escrow {escrow}  spend key {spend_public.hex()}"
            f"{'  (devnet)' if devnet else ''}"
            f"{f'  registry {registry}' if registry else ''}",
            flush=True,
        )

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())  # about a third less per hop
    app = create_app(
        client,
        api_key=api_key,
        allow_origins=origins,
        loopback_hosts_only=loopback,
    )
    if allowlists is not None:
        app.on_cleanup.append(lambda _: allowlists.chain.close())
    web.run_app(
        app,
        sock=sock,
        handler_cancellation=True,
        access_log=None,
        print=announce,
    )
    return 0


async def _chain_global_id(chain: str) -> int:
    from contracts.chain.toncenter import ToncenterClient

    async with ToncenterClient(chain, max_retries=2, timeout=10.0) as client:
        return await client.get_global_id()


async def _check_escrow(chain: str, escrow: str, vault: str, spend_public: bytes) -> str | None:
    """Why this gateway cannot pay from ``escrow`` on ``chain``, or None if it can."""
    import aiohttp
    from pytoniq_core import Address

    from contracts.chain.getters import GetterError, get_escrow_data
    from contracts.chain.results import ToncenterError
    from contracts.chain.toncenter import ToncenterClient

    client = ToncenterClient(chain, max_retries=2, timeout=10.0)
    not_deployed = f"escrow {escrow} is not deployed on the chain at {chain} (or is no escrow)"
    try:
        data = await get_escrow_data(client, escrow)
    except GetterError as e:
        return f"{not_deployed}: {e}"
    except ToncenterError as e:
        if e.exit_code is not None:  # the get-method ran, and failed
            return f"{not_deployed}: {e}"
        return f"cannot read escrow {escrow} from the chain at {chain}: {e}"
    except (aiohttp.ClientError, ValueError) as e:
        return f"cannot read escrow {escrow} from the chain at {chain}: {e}"
    finally:
        await client.close()
    on_chain = data.spend_key.to_bytes(32, "big")
    if on_chain != spend_public:
        return (
            f"escrow {escrow} accepts vouchers signed by spend key {on_chain.hex()}, but this "
            f"gateway's spend key is {spend_public.hex()}: the matcher would refuse every "
            "voucher; use the state dir (spend.key) that opened it, or open an escrow "
            "for this key"
        )
    if data.vault != Address(vault):
        return (
            f"escrow {escrow} pays vault {data.vault.to_str(is_user_friendly=False)}, "
            f"not {Address(vault).to_str(is_user_friendly=False)} (--vault)"
        )
    if data.state_name != "open":
        print(
            f"warning: escrow {escrow} is {data.state_name}: the matcher takes no new jobs "
            "paid from it",
            file=sys.stderr,
        )
    return None


def _bind(host: str, port: int) -> socket.socket | None:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        return None
    return sock


def _port_from(url: Any) -> int:
    if isinstance(url, str):
        from urllib.parse import urlsplit

        port = urlsplit(url).port
        if port:
            return port
    return DEFAULT_PORT


def _first_int(*values: Any) -> int:
    for value in values:
        if value is not None:
            return int(value)
    raise ValueError("no value")


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


# -- chat ------------------------------------------------------------------------------


def _gateway_base(url: str) -> str:
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


def _format_ton(nanoton: int) -> str:
    whole, frac = divmod(nanoton, 1_000_000_000)
    text = f"{whole}.{frac:09d}".rstrip("0").rstrip(".")
    return text or "0"


def cmd_chat(args: argparse.Namespace) -> int:
    import openai

    config = load_stack_config()
    base_url = _gateway_base(args.gateway or config.get("gateway_url") or DEFAULT_GATEWAY)
    api_key = args.api_key or os.environ.get("IMAGO_API_KEY") or config.get("api_key") or "imago"
    client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=300)
    out = sys.stdout
    dim = ("\033[2m", "\033[0m") if out.isatty() else ("", "")
    try:
        model = args.model or config.get("model") or _first_model(client)
        messages = [{"role": "user", "content": args.question}]
        extra: dict[str, Any] = {"max_tokens": args.max_tokens, "temperature": args.temperature}
        usage = None
        if args.stream:
            stream = client.chat.completions.create(
                model=model,
                messages=messages,
                stream=True,
                stream_options={"include_usage": True},
                **extra,
            )
            for chunk in stream:
                if chunk.choices:
                    out.write(chunk.choices[0].delta.content or "")
                    out.flush()
                if chunk.usage is not None:
                    usage = chunk.usage
            out.write("\n")
        else:
            response = client.chat.completions.create(model=model, messages=messages, **extra)
            out.write((response.choices[0].message.content or "") + "\n")
            usage = response.usage
    except openai.APIConnectionError:
        print(
            f"error: cannot reach the gateway at {base_url}; start it with "
            "`imago gateway` or `imago up`",
            file=sys.stderr,
        )
        return 1
    except openai.APIStatusError as e:
        print(f"error: {e.status_code}: {_message(e)}", file=sys.stderr)
        return 1
    except openai.APIError as e:
        out.write("\n")
        print(f"error: {_message(e)}", file=sys.stderr)
        return 1
    if usage is not None:
        extra_usage = usage.model_extra or {}
        cost = extra_usage.get("cost_nanoton")
        node = (extra_usage.get("imago_receipt") or {}).get("node", "")
        line = f"{usage.prompt_tokens} prompt + {usage.completion_tokens} completion tokens"
        if cost is not None:
            line += f" · {_format_ton(int(cost))} TON"
        if node:
            line += f" · node {node[:12]}… (receipt verified)"
        out.write(f"{dim[0]}{line}{dim[1]}\n")
    out.flush()
    return 0


def _first_model(client: Any) -> str:
    models = client.models.list().data
    if not models:
        raise SystemExit("error: no model is served right now")
    return models[0].id


def _message(error: Exception) -> str:
    body = getattr(error, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
    return str(getattr(error, "message", error))
