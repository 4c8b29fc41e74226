"""The node agent's aiohttp application: ``create_app(config)``.

Lifetimes live in ``cleanup_ctx``: the shared upstream ``ClientSession``, the engine
(attached by URL, or a supervised vLLM), the model list refresh and the registration
with the matcher (which first fetches the matcher's ticket key). State is held under
typed ``AppKey``s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import platform
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from aiohttp import web
from pydantic import ValidationError

from node.attest import DEFAULT_PCCS_URL, Attester, make_provider, pccs_collateral_fetcher
from node.claim_loop import claim_settings, claims_ctx
from node.claims import DEFAULT_CLAIM_EVERY
from node.engine import EngineBackend, OpenAIHttpBackend
from node.jobs import JobService
from node.keys import NodeKeys, load_or_create_keys
from node.offers import OfferBook
from node.receipt_log import FILE_NAME as RECEIPT_LOG
from node.receipt_log import ReceiptLog
from node.seen import SeenJobs
from node.supervisor import (
    DEFAULT_MODEL_ID,
    Supervisor,
    default_model_dir,
    detect_gpus,
    vllm_launch,
)
from node.tickets import MatcherKeys
from protocol.api import (
    NodeIdentity,
    NodeRegistration,
    NodeStatus,
    registration_message,
)
from protocol.errors import ApiError, error_middleware
from protocol.home import node_keystore
from protocol.signed import network_global_id

__all__ = ["NodeConfig", "create_app", "NodeState", "STATE"]

log = logging.getLogger("imago.node")


@dataclass
class NodeConfig:
    state_dir: Path
    devnet: bool = False
    # the network its receipts name (config param 19); None: the devnet's with devnet,
    # and create_app refuses to start without one off the devnet
    global_id: int | None = None
    attestation: str | None = None  # None: "dev" on the devnet, "tdx" elsewhere
    pccs_url: str = DEFAULT_PCCS_URL  # where a TDX node fetches its DCAP collateral
    passphrase: str | None = field(default=None, repr=False)
    # engine: attach to `upstream`, or supervise vLLM on `model_dir`
    upstream: str | None = None
    upstream_api_key: str | None = field(default=None, repr=False)
    model_dir: Path | None = None
    model_ids: list[str] = field(default_factory=list)  # served ids; [] = ask the engine
    engine_python: str | None = None
    engine_port: int = 8801
    max_model_len: int = 2048
    engine_dtype: str = "bfloat16"
    engine_start_timeout: float = 600.0
    continuous_usage: bool = True
    # offer
    price_prompt: int = 20_000_000
    price_completion: int = 60_000_000
    max_concurrent: int = 64
    # matcher
    matcher: str | None = None
    matcher_key: str | None = None  # hex: the only ticket key trusted (else the URL's)
    public_url: str | None = None
    provider: str | None = None
    register_interval: float = 30.0
    # claims (node/claims.py): on when chain and claim_wallet are set
    chain: str | None = None
    claim_wallet: str | None = None  # a wallet name in $IMAGO_HOME/wallets, or a keystore path
    claim_passphrase: str | None = field(default=None, repr=False)
    claim_every: float = DEFAULT_CLAIM_EVERY
    claim_multiple: float | None = None  # None: 0 on the devnet, 1000 elsewhere

    @property
    def attestation_kind(self) -> str:
        return self.attestation or ("dev" if self.devnet else "tdx")


@dataclass
class NodeState:
    """Everything the handlers share; one per application."""

    config: NodeConfig
    keys: NodeKeys
    attester: Attester
    offers: OfferBook
    seen: SeenJobs
    matcher_keys: MatcherKeys
    engine_ready: asyncio.Event
    hardware: str
    global_id: int  # the network its receipts name
    backend: EngineBackend | None = None
    jobs: JobService | None = None
    supervisor: Supervisor | None = None
    last_matcher_contact: float = 0.0
    registered: bool = False
    receipts: ReceiptLog | None = None


STATE = web.AppKey("imago_node_state", NodeState)


def describe_hardware() -> str:
    gpus = detect_gpus()
    if gpus:
        return f"{len(gpus)} x GPU: " + "; ".join(gpus)
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"CPU: {model} ({os.cpu_count()} cores), no GPU"


def create_app(config: NodeConfig, *, keys: NodeKeys | None = None) -> web.Application:
    """The node application. Raises AttestationUnavailable or KeystoreError early.

    ``keys`` overrides the keystore (tests); otherwise keys load from (or are created
    in) ``state_dir/node_keys.json``. A ``matcher_key`` that is not 32 bytes of hex
    raises ValueError.
    """
    pinned = _matcher_key(config.matcher_key)
    claims = claim_settings(config)  # ValueError on half a configuration or a bad wallet
    config.state_dir.mkdir(parents=True, exist_ok=True)
    if keys is None:
        keys = load_or_create_keys(node_keystore(config.state_dir), config.passphrase)
    provider = make_provider(config.attestation_kind, keys, devnet=config.devnet)
    global_id = network_global_id(config.global_id, devnet=config.devnet)  # ValueError
    state = NodeState(
        config=config,
        keys=keys,
        attester=Attester(
            keys,
            provider,
            collateral_fetcher=pccs_collateral_fetcher(config.pccs_url)
            if provider.kind == "tdx"
            else None,
        ),
        offers=OfferBook(config.price_prompt, config.price_completion),
        seen=SeenJobs(config.state_dir / "jobs.seen"),
        matcher_keys=MatcherKeys(config.matcher, pinned),
        engine_ready=asyncio.Event(),
        hardware=describe_hardware(),
        receipts=ReceiptLog(config.state_dir / RECEIPT_LOG),
        global_id=global_id,
    )
    app = web.Application(middlewares=[error_middleware(log)], client_max_size=16 * 1024 * 1024)
    app[STATE] = state
    app.cleanup_ctx.append(_engine_ctx)
    app.cleanup_ctx.append(_registration_ctx)
    if claims is not None:
        app.cleanup_ctx.append(claims_ctx(claims))
    app.router.add_get("/health", _health)
    app.router.add_get("/v1/identity", _identity)
    app.router.add_post("/v1/attest", _attest)
    app.router.add_get("/v1/status", _status)
    app.router.add_post("/v1/jobs", _jobs)
    return app


def _matcher_key(text: str | None) -> bytes | None:
    if text is None:
        return None
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise ValueError(f"a matcher key is 64 hex characters, not {text[:80]!r}")
    return key


# -- lifetimes ----------------------------------------------------------------------


async def _engine_ctx(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    config = state.config
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60, ttl_dns_cache=None),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
        auto_decompress=False,
    )
    tasks: list[asyncio.Task] = []
    try:
        if config.upstream:
            base_url, label = config.upstream, "openai-compatible"
        else:
            model_dir = config.model_dir or default_model_dir()
            served = (config.model_ids or [DEFAULT_MODEL_ID])[0]
            launch = vllm_launch(
                model_dir=model_dir,
                served_model_name=served,
                port=config.engine_port,
                state_dir=config.state_dir,
                engine_python=config.engine_python,
                max_model_len=config.max_model_len,
                dtype=config.engine_dtype,
            )
            state.supervisor = Supervisor(
                launch, session, start_timeout=config.engine_start_timeout
            )
            base_url, label = launch.base_url, launch.label
            tasks.append(asyncio.create_task(state.supervisor.run(), name="engine-supervisor"))
        backend = OpenAIHttpBackend(
            session,
            base_url,
            label=label,
            api_key=config.upstream_api_key,
            continuous_usage=config.continuous_usage,
        )
        state.backend = backend
        state.jobs = JobService(
            state.keys,
            backend,
            state.offers,
            state.seen,
            state.matcher_keys,
            max_concurrent=config.max_concurrent,
            engine_ready=state.engine_ready,
            receipt_log=state.receipts,
            global_id=state.global_id,
        )
        tasks.append(asyncio.create_task(_watch_engine(state), name="engine-watch"))
        yield
    finally:
        for task in reversed(tasks):  # the watcher first, then the supervisor (stops vLLM)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await session.close()
        state.seen.close()
        if state.receipts is not None:
            state.receipts.close()


async def _watch_engine(state: NodeState) -> None:
    """Keep ``engine_ready`` and the model list current (the engine may restart)."""
    backend = state.backend
    while True:
        if state.supervisor is not None and not state.supervisor.ready.is_set():
            state.engine_ready.clear()  # the engine died or is (re)starting
            await state.supervisor.ready.wait()
        healthy = await backend.health()
        if healthy and not state.engine_ready.is_set():
            try:
                served = await backend.models()
            except Exception as e:  # not answering yet; try again shortly
                log.info("engine model list unavailable: %s", e)
                served = None
            if served is not None:
                by_id = {m.get("id"): m.get("max_model_len") for m in served}
                wanted = state.config.model_ids or list(by_id)
                # An attached engine that does not say its context length: unknown.
                fallback = None if state.config.upstream else state.config.max_model_len
                state.offers.set_models((m, by_id.get(m) or fallback) for m in wanted)
                state.engine_ready.set()
                log.info("engine ready: %s serving %s", backend.describe(), ", ".join(wanted))
        elif not healthy and state.engine_ready.is_set():
            log.warning("engine unhealthy: not taking jobs")
            state.engine_ready.clear()
        await asyncio.sleep(2.0 if state.engine_ready.is_set() else 0.5)


async def _registration_ctx(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    if not state.config.matcher:
        yield
        return
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        state.matcher_keys.session = session
        task = asyncio.create_task(_register_loop(state, session), name="matcher-registration")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            state.matcher_keys.session = None


async def _register_loop(state: NodeState, session: aiohttp.ClientSession) -> None:
    config = state.config
    url = config.matcher.rstrip("/") + "/v1/nodes"
    public_url = config.public_url or "http://127.0.0.1:8800"

    def body() -> str:  # signed afresh at each attempt: the matcher refuses stale ones
        signed_at = int(time.time())
        message = registration_message(public_url, state.keys.node_id, signed_at)
        return NodeRegistration(
            url=public_url,
            ed25519_public=state.keys.node_id,
            signed_at=signed_at,
            signature=state.keys.ed25519.sign(message).hex(),
        ).model_dump_json()

    backoff = 1.0
    while True:
        await state.engine_ready.wait()  # no point in traffic before the engine answers
        forgotten = time.monotonic() - state.last_matcher_contact > config.register_interval
        if state.registered and not forgotten:
            await asyncio.sleep(config.register_interval / 3)
            continue
        # The key first: registered, the node gets jobs, whose tickets it must check.
        if not await state.matcher_keys.update():
            ok, text = False, "the matcher's ticket key is unavailable or refused"
        else:
            try:
                async with session.post(
                    url, data=body(), headers={"Content-Type": "application/json"}
                ) as r:
                    text = await r.text()
                    ok = r.status == 200
            except (aiohttp.ClientError, TimeoutError) as e:
                ok, text = False, f"{type(e).__name__}: {e}"
        if ok:
            if not state.registered:
                log.info("registered with the matcher %s as %s", config.matcher, public_url)
            state.registered = True
            state.last_matcher_contact = time.monotonic()
            backoff = 1.0
            await asyncio.sleep(config.register_interval / 3)
        else:
            state.registered = False
            log.warning("matcher registration failed (%s); retry in %.0f s", text[:300], backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 60.0)


# -- handlers -----------------------------------------------------------------------


async def _health(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if state.engine_ready.is_set() and await state.backend.health():
        return web.json_response({"status": "ok"})
    raise ApiError.unavailable("the engine is not ready", "engine_not_ready")


async def _identity(request: web.Request) -> web.Response:
    state = request.app[STATE]
    doc = NodeIdentity(
        ed25519_public=state.keys.node_id,
        x25519_public=state.keys.x25519_public.hex(),
        attestation_kind=state.attester.kind,
        provider=state.config.provider,
    )
    return web.Response(text=doc.model_dump_json(), content_type="application/json")


async def _attest(request: web.Request) -> web.Response:
    state = request.app[STATE]
    try:
        nonce = bytes.fromhex((await request.json())["nonce"])
        if len(nonce) != 32:
            raise ValueError("a nonce is 32 bytes")
    except (ValueError, KeyError, TypeError, ValidationError):
        raise ApiError.bad_request(
            'body must be {"nonce": <64 hex characters>}', "invalid_nonce"
        ) from None
    try:
        doc = await state.attester.attest(nonce)
    except Exception as e:
        log.error("attestation failed: %s", e)
        raise ApiError.unavailable(f"attestation failed: {e}", "attestation_unavailable") from e
    state.last_matcher_contact = time.monotonic()
    return web.Response(text=doc.model_dump_json(), content_type="application/json")


async def _status(request: web.Request) -> web.Response:
    state = request.app[STATE]
    state.last_matcher_contact = time.monotonic()
    doc = NodeStatus(
        models=state.offers.offers,
        hardware=state.hardware,
        max_concurrent=state.config.max_concurrent,
        active_jobs=state.jobs.active if state.jobs else 0,
        healthy=state.engine_ready.is_set(),
        engine=state.backend.describe() if state.backend else "none",
    )
    return web.Response(text=doc.model_dump_json(), content_type="application/json")


async def _jobs(request: web.Request) -> web.StreamResponse:
    return await request.app[STATE].jobs.handle(request)
