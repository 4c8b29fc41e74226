"""The matcher's aiohttp application: ``create_app(config)`` and thin handlers.

Everything with a lifetime (database engine and ledger writer, the ClientSession to
nodes, the APScheduler scheduler) lives in ``cleanup_ctx`` and is reached through
typed app keys.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import time

import aiohttp
from aiohttp import web
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from pydantic import ValidationError
from sqlalchemy import Engine, select

from contracts.chain.allowlists import Allowlists
from contracts.chain.devnet import is_devnet
from contracts.chain.toncenter import ToncenterClient
from marketplace.config import MatcherConfig
from marketplace.db import SpendVoucherRecord, make_engine
from marketplace.escrows import EscrowBook, EscrowMismatch
from marketplace.ledger import Ledger, VoucherRejected, VoucherUpdate
from marketplace.metrics import Metrics
from marketplace.providers import ProviderBook
from marketplace.registry import AdmissionError, NodeRegistry
from marketplace.relay import Relay, normalize_escrow
from marketplace.routing import NoRoute, rank
from marketplace.settlement.publication import READ_ENGINE, add_routes
from marketplace.tickets import TicketSigner, load_or_create_ticket_key
from protocol.api import (
    MatcherTicketKey,
    NodeRegistration,
    RelayRequest,
    RouteCandidate,
    RouteRequest,
    RouteResponse,
    VoucherSubmission,
)
from protocol.errors import ApiError, error_middleware
from protocol.signed import (
    SignedObjectError,
    SpendVoucher,
    network_global_id,
    signature_valid,
)
from protocol.tickets import TICKET_KEY_PATH

__all__ = [
    "ALLOWLISTS",
    "CONFIG",
    "ENGINE",
    "ESCROWS",
    "GLOBAL_ID",
    "PROVIDERS",
    "LEDGER",
    "METRICS",
    "REGISTRY",
    "RELAY",
    "SCHEDULER",
    "SESSION",
    "SETTLEMENT",
    "TICKETS",
    "StartupRefused",
    "create_app",
]

log = logging.getLogger(__name__)


class StartupRefused(RuntimeError):
    """The configuration is unsafe against the chain it names (or names no network); the
    matcher does not start."""


CONFIG = web.AppKey("config", MatcherConfig)
ENGINE = web.AppKey("engine", Engine)
LEDGER = web.AppKey("ledger", Ledger)
SESSION = web.AppKey("session", aiohttp.ClientSession)
REGISTRY = web.AppKey("registry", NodeRegistry)
RELAY = web.AppKey("relay", Relay)
METRICS = web.AppKey("metrics", Metrics)
SCHEDULER = web.AppKey("scheduler", AsyncIOScheduler)
ESCROWS = web.AppKey("escrows", EscrowBook)
PROVIDERS = web.AppKey("providers", ProviderBook)
TICKETS = web.AppKey("tickets", TicketSigner)
ALLOWLISTS = web.AppKey("allowlists", Allowlists)
CHAIN = web.AppKey("chain", ToncenterClient)
SETTLEMENT = web.AppKey("settlement", object)  # a SettlementService, imported when used
GLOBAL_ID = web.AppKey("global_id", int)  # the network vouchers and receipts must name
VOUCHERS = SpendVoucherRecord.__table__


# --- lifetimes --------------------------------------------------------------------------


async def _database(app: web.Application):
    config = app[CONFIG]
    engine = make_engine(config.db_url, sqlite_synchronous=config.sqlite_synchronous)
    ledger = Ledger(engine, config.instance)
    await ledger.start()
    app[ENGINE] = app[READ_ENGINE] = engine
    app[LEDGER] = ledger
    yield
    await ledger.stop()
    engine.dispose()


async def _node_client(app: web.Application):
    config = app[CONFIG]
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60, ttl_dns_cache=300)
    session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
    app[SESSION] = session
    registry = NodeRegistry(
        session,
        app[LEDGER],
        config.attestation_policy,
        timeout_s=config.node_timeout_s,
        providers=app.get(PROVIDERS),
        allowlists=app.get(ALLOWLISTS),
    )
    app[REGISTRY] = registry
    app[RELAY] = Relay(
        config,
        session,
        registry,
        app[LEDGER],
        app[METRICS],
        app[TICKETS],
        app.get(ESCROWS),
        global_id=app[GLOBAL_ID],
    )
    yield
    await session.close()


def _network(config: MatcherConfig, on_chain: int | None) -> int:
    """The global id vouchers and receipts must name: the configured one, else the
    devnet's on the devnet, else the chain's (``on_chain``); none otherwise."""
    try:
        if config.global_id is None and not config.devnet:
            return network_global_id(on_chain, devnet=False)
        return network_global_id(config.global_id, devnet=config.devnet)
    except ValueError as e:
        raise StartupRefused(f"{e}: give --global-id or --chain") from e


async def _chain(app: web.Application):
    config = app[CONFIG]
    if config.chain_url is None:
        app[GLOBAL_ID] = _network(config, None)
        yield
        return
    if config.devnet and not await is_devnet(config.chain_url):
        raise StartupRefused(
            f"--devnet accepts dev attestations, which only the Imago devnet may; the chain "
            f"at {config.chain_url} is not one (it does not answer /devnet/health)"
        )
    chain = app[CHAIN] = ToncenterClient(config.chain_url)
    try:
        # read only when neither the configuration nor the devnet says which network
        needed = config.global_id is None and not config.devnet
        app[GLOBAL_ID] = _network(config, await chain.get_global_id() if needed else None)
    except Exception as e:
        await chain.close()
        if isinstance(e, StartupRefused):
            raise
        raise StartupRefused(
            f"cannot read the global id of the chain at {config.chain_url}: {e}"
        ) from e
    escrows = app[ESCROWS] = EscrowBook(chain, config.vault)
    held = await app[LEDGER].call(
        lambda c: c.execute(select(VOUCHERS.c.escrow, VOUCHERS.c.cumulative)).all()
    )
    for escrow, cumulative in held:  # what clients signed away survives a restart
        escrows.voucher_stored(escrow, int(cumulative))
    if config.registry is not None:
        app[PROVIDERS] = ProviderBook(chain, config.registry)
        app[ALLOWLISTS] = Allowlists(chain, config.registry, ttl_s=config.allowlist_ttl_s)
    yield
    await chain.close()


async def _settlement(app: web.Application):
    """The settlement service, for a matcher that operates its Vault."""
    config = app[CONFIG]
    if config.settlement is None:
        yield
        return
    if CHAIN not in app or config.vault is None or config.registry is None:
        raise StartupRefused(
            "settling needs --chain, --vault and --registry (a job's Provider is paid)"
        )
    from contracts.chain.wallet import Wallet
    from marketplace.settlement.service import SettlementError, SettlementService
    from protocol import keystore

    settle = config.settlement
    try:
        wallet = Wallet.from_keystore(app[CHAIN], settle.operator_wallet, settle.passphrase)
        operator, _ = keystore.load(settle.operator_key, settle.passphrase)
    except (OSError, keystore.KeystoreError) as e:
        raise StartupRefused(f"the operator's keys: {e}") from e
    service = SettlementService(
        settle, app[LEDGER], app[CHAIN], wallet, operator.ed25519, config.vault, config.instance,
        app[GLOBAL_ID],
    )  # fmt: skip
    try:
        await service.start()
    except SettlementError as e:
        raise StartupRefused(str(e)) from e
    app[SETTLEMENT] = service
    yield


async def _scheduler(app: web.Application):
    config = app[CONFIG]
    registry = app[REGISTRY]
    scheduler = AsyncIOScheduler()
    common = {"coalesce": True, "max_instances": 1, "misfire_grace_time": None}
    scheduler.add_job(
        registry.poll_all, "interval", seconds=config.status_interval_s, id="poll", **common
    )
    scheduler.add_job(
        registry.reattest_all,
        "interval",
        seconds=config.reattest_interval_s,
        id="reattest",
        **common,
    )
    if SETTLEMENT in app:
        scheduler.add_job(
            app[SETTLEMENT].tick,
            "interval",
            seconds=config.settlement.tick_s,
            id="settle",
            **common,
        )
    scheduler.start()
    app[SCHEDULER] = scheduler
    readmit = asyncio.create_task(registry.readmit_known(), name="imago-readmit")
    yield
    readmit.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await readmit
    scheduler.shutdown(wait=False)


async def _stopping(app: web.Application) -> None:
    app[RELAY].stopping = True


# --- handlers ---------------------------------------------------------------------------


async def _json_body(request: web.Request, model):
    try:
        return model.model_validate_json(await request.read())
    except ValidationError as e:
        raise ApiError.invalid_body(e) from None


REGISTRATION_SKEW_S = 300


def _check_registration_signature(registration: NodeRegistration) -> None:
    """Only the node's own key may say where the node is (else anyone could point its
    identity at a proxy of theirs), and only recently (else a replay could)."""
    try:
        signature = bytes.fromhex(registration.signature or "")
        key = bytes.fromhex(registration.ed25519_public)
    except ValueError as e:
        raise ApiError(400, f"malformed registration: {e}") from e
    if not signature_valid(signature, registration.message(), key):
        raise ApiError.forbidden("the registration is not signed by the node key", "bad_signature")
    if abs(time.time() - registration.signed_at) > REGISTRATION_SKEW_S:
        raise ApiError.forbidden(
            "the registration is not signed within the last minutes", "stale_registration"
        )


async def register_node(request: web.Request) -> web.Response:
    registration = await _json_body(request, NodeRegistration)
    _check_registration_signature(registration)
    try:
        node = await request.app[REGISTRY].admit(registration)
    except AdmissionError as e:
        kind = "permission_error" if e.status == 403 else "server_error"
        raise ApiError(e.status, f"node not admitted: {e}", type=kind, code=e.code) from e
    return web.json_response(
        {
            "status": "admitted",
            "node_id": node.node_id,
            "attestation_kind": node.attestation.kind,
            "measurement": node.verified.measurement.hex(),
        }
    )


async def route(request: web.Request) -> web.Response:
    body = await _json_body(request, RouteRequest)
    registry = request.app[REGISTRY]
    try:
        ranked = rank(
            registry.serving(body.model),
            body.model,
            body.max_price_prompt,
            body.max_price_completion,
        )
    except NoRoute as e:
        kind = "service_unavailable" if e.status == 503 else "invalid_request_error"
        raise ApiError(e.status, str(e), type=kind, code=e.code, param="model") from e
    response = RouteResponse(
        candidates=[
            RouteCandidate(node_id=r.node.node_id, attestation=r.node.attestation, offer=r.offer)
            for r in ranked
        ],
        ttl_seconds=request.app[CONFIG].route_ttl_s,
    )
    return web.Response(body=response.model_dump_json().encode(), content_type="application/json")


async def relay(request: web.Request) -> web.StreamResponse:
    body = await _json_body(request, RelayRequest)
    return await request.app[RELAY].handle(request, body)


async def submit_voucher(request: web.Request) -> web.Response:
    body = await _json_body(request, VoucherSubmission)
    config = request.app[CONFIG]
    try:
        voucher, voucher_hash = SpendVoucher.parse_boc(
            base64.b64decode(body.voucher, validate=True)
        )
        signature = bytes.fromhex(body.signature)
        spend_public = bytes.fromhex(body.spend_public)
    except (ValueError, binascii.Error, SignedObjectError) as e:
        raise ApiError(400, f"malformed voucher: {e}", code="invalid_voucher") from e
    # The hash of the cell we store, which the Escrow will check: a non-canonical
    # encoding of a signed voucher must not pass here and fail on-chain.
    if not signature_valid(signature, voucher_hash, spend_public):
        raise ApiError.forbidden("the voucher's signature does not verify", "bad_signature")
    if voucher.global_id != request.app[GLOBAL_ID]:
        raise ApiError(
            400,
            f"the voucher is for network {voucher.global_id}, not {request.app[GLOBAL_ID]}",
            code="wrong_network",
        )
    vault = voucher.vault.to_str(is_user_friendly=False)
    if config.vault is not None and vault != normalize_escrow(config.vault):
        raise ApiError(400, "the voucher names another vault", code="wrong_vault")
    if ESCROWS in request.app:
        try:
            await request.app[ESCROWS].check(voucher.escrow, spend_public)
        except EscrowMismatch as e:
            raise ApiError.forbidden(str(e), e.code) from e
    try:
        result = await request.app[LEDGER].submit_voucher(
            VoucherUpdate(
                escrow=voucher.escrow.to_str(is_user_friendly=False),
                vault=vault,
                spend_public=spend_public.hex(),
                cumulative=voucher.cumulative,
                voucher_boc=body.voucher,
                signature=signature.hex(),
                jobs={j.job_id.lower(): j.amount for j in body.jobs},
            )
        )
    except VoucherRejected as e:
        kind = "permission_error" if e.status == 403 else "invalid_request_error"
        raise ApiError(e.status, str(e), type=kind, code=e.code) from e
    if ESCROWS in request.app:
        request.app[ESCROWS].voucher_stored(
            voucher.escrow.to_str(is_user_friendly=False), voucher.cumulative
        )
    return web.json_response({"status": "stored", **result})


async def models(request: web.Request) -> web.Response:
    data = []
    for model_id, offers in sorted(request.app[REGISTRY].models().items()):
        data.append(
            {
                "id": model_id,
                "object": "model",
                "created": int(time.time()),
                "owned_by": "imago",
                "imago_price_prompt": min(o.price_prompt for _, o in offers),
                "imago_price_completion": min(o.price_completion for _, o in offers),
                "imago_nodes": len(offers),
            }
        )
    return web.json_response({"object": "list", "data": data})


async def ticket_key(request: web.Request) -> web.Response:
    body = MatcherTicketKey(ed25519_public=request.app[TICKETS].public.hex())
    return web.Response(text=body.model_dump_json(), content_type="application/json")


async def health(request: web.Request) -> web.Response:
    nodes = sum(1 for n in request.app[REGISTRY].nodes.values() if n.routable)
    return web.json_response({"status": "ok", "nodes": nodes})


async def metrics(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY]
    text = request.app[METRICS].render(
        request.app[LEDGER].counts,
        nodes_admitted=len(registry.nodes),
        nodes_healthy=sum(1 for n in registry.nodes.values() if n.routable),
    )
    return web.Response(
        body=text.encode(), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}
    )


# --- the factory ------------------------------------------------------------------------


def create_app(config: MatcherConfig | None = None) -> web.Application:
    config = config or MatcherConfig()
    app = web.Application(
        middlewares=[error_middleware(log)], client_max_size=config.max_relay_body_bytes
    )
    app[CONFIG] = config
    app[METRICS] = Metrics()
    app[TICKETS] = load_or_create_ticket_key(config.ticket_key_path)
    app.cleanup_ctx.extend([_database, _chain, _settlement, _node_client, _scheduler])
    app.on_shutdown.append(_stopping)
    app.router.add_post("/v1/nodes", register_node)
    app.router.add_post("/v1/route", route)
    app.router.add_post("/v1/relay", relay)
    app.router.add_post("/v1/vouchers", submit_voucher)
    app.router.add_get("/v1/models", models)
    app.router.add_get(TICKET_KEY_PATH, ticket_key)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    add_routes(app)  # the public ledger (docs/ledger.md)
    return app
