"""The node learns its matcher's ticket key, registers with it, retries, and
re-registers when forgotten."""

from __future__ import annotations

import asyncio
import os

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from node.app import STATE
from node.tickets import REFRESH_INTERVAL_S
from protocol.api import AttestationDoc, NodeRegistration
from protocol.attestation import AttestationPolicy, verify_attestation
from tests.node.conftest import MATCHER_KEY, post_job, seal_job, sign_ticket

MODEL = "fixture-model"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


class FakeMatcher:
    """FIXTURE: a matcher that serves its ticket key (``None``: answers 503) and
    attests a registering node with its own nonce."""

    def __init__(
        self, refuse_first: int = 0, ticket_key: Ed25519PrivateKey | None = MATCHER_KEY
    ) -> None:
        self.refuse_first = refuse_first
        self.ticket_key = ticket_key
        self.attempts = 0
        self.key_fetches = 0
        self.registered: list[NodeRegistration] = []
        app = web.Application()
        app.router.add_post("/v1/nodes", self._register)
        app.router.add_get("/v1/ticket-key", self._ticket_key)
        self.server = TestServer(app)

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    async def _ticket_key(self, _request: web.Request) -> web.Response:
        self.key_fetches += 1
        if self.ticket_key is None:
            return web.json_response({"error": {"message": "not yet", "type": "x"}}, status=503)
        public = self.ticket_key.public_key().public_bytes_raw().hex()
        return web.json_response({"ed25519_public": public})

    async def _register(self, request: web.Request) -> web.Response:
        self.attempts += 1
        reg = NodeRegistration.model_validate(await request.json())
        if self.attempts <= self.refuse_first:
            return web.json_response({"error": {"message": "not yet", "type": "x"}}, status=503)
        nonce = os.urandom(32)
        async with (
            aiohttp.ClientSession() as s,
            s.post(reg.url + "/v1/attest", json={"nonce": nonce.hex()}) as r,
        ):
            doc = AttestationDoc.model_validate(await r.json())
        verify_attestation(doc, AttestationPolicy(allow_dev=True), expected_nonce=nonce)
        assert doc.ed25519_public == reg.ed25519_public
        self.registered.append(reg)
        return web.json_response({"status": "ok"})


async def test_registers_retries_and_reregisters_when_forgotten(make_node, unused_tcp_port):
    matcher = FakeMatcher(refuse_first=1)
    await matcher.server.start_server()
    try:
        public = f"http://127.0.0.1:{unused_tcp_port}"
        node = await make_node(
            port=unused_tcp_port,
            matcher=matcher.url,
            register_interval=0.6,
            public_url=public,
        )
        for _ in range(100):
            if matcher.registered:
                break
            await asyncio.sleep(0.05)
        assert matcher.registered, f"not registered after {matcher.attempts} attempts"
        assert matcher.attempts >= 2  # refused once, retried
        assert matcher.registered[0].ed25519_public == node.keys.node_id
        # The matcher never polls this node: after the interval it registers again.
        count = len(matcher.registered)
        for _ in range(100):
            if len(matcher.registered) > count:
                break
            await asyncio.sleep(0.05)
        assert len(matcher.registered) > count
    finally:
        await matcher.server.close()


async def wait_for(condition, what: str) -> None:
    for _ in range(100):
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting until {what}")


async def ticketed_job(node, signer: Ed25519PrivateKey):
    """A job whose ticket ``signer`` signed (the node's matcher, or someone else)."""
    job_id, key, sealed = seal_job(node.keys.x25519_public, {"model": MODEL, "messages": MESSAGES})
    ticket = sign_ticket(node.keys.ed25519_public, job_id, sealed, signer)
    return await post_job(node.session, node.url, job_id, key, sealed, ticket=ticket)


async def node_learning_its_key(make_node, matcher, port: int):
    """A node with no pinned key, registering with ``matcher``."""
    return await make_node(
        port=port, matcher=matcher.url, matcher_key=None, public_url=f"http://127.0.0.1:{port}"
    )


async def test_the_node_learns_the_matcher_key_before_it_registers(make_node, unused_tcp_port):
    matcher = FakeMatcher(ticket_key=None)  # no key to give yet
    await matcher.server.start_server()
    try:
        node = await node_learning_its_key(make_node, matcher, unused_tcp_port)
        await wait_for(lambda: matcher.key_fetches >= 1, "the node asks for the key")
        r = await ticketed_job(node, MATCHER_KEY)
        assert r.status == 503 and r.body["error"]["code"] == "matcher_unknown"
        assert not matcher.attempts  # no registration without the key
        matcher.ticket_key = MATCHER_KEY
        await wait_for(lambda: matcher.registered, "the node registers")  # after a backoff
        assert node.app[STATE].matcher_keys.current == MATCHER_KEY.public_key().public_bytes_raw()
        assert (await ticketed_job(node, MATCHER_KEY)).status == 200
        r = await ticketed_job(node, Ed25519PrivateKey.generate())
        assert r.status == 403 and r.body["error"]["code"] == "ticket_invalid"
    finally:
        await matcher.server.close()


async def test_a_matcher_key_change_keeps_the_previous_key(make_node, unused_tcp_port):
    matcher = FakeMatcher()
    await matcher.server.start_server()
    try:
        node = await node_learning_its_key(make_node, matcher, unused_tcp_port)
        await wait_for(lambda: matcher.registered, "the node registers")
        old, new = MATCHER_KEY, Ed25519PrivateKey.generate()
        matcher.ticket_key = new  # the matcher restarted with a new key; the node stays
        await asyncio.sleep(REFRESH_INTERVAL_S)  # registered, so it refreshes on demand
        fetches = matcher.key_fetches
        assert (await ticketed_job(node, new)).status == 200
        assert matcher.key_fetches == fetches + 1
        assert (await ticketed_job(node, old)).status == 200  # signed before the change
        # Forged tickets do not turn into a request to the matcher each.
        for _ in range(3):
            r = await ticketed_job(node, Ed25519PrivateKey.generate())
            assert r.status == 403 and r.body["error"]["code"] == "ticket_invalid"
        assert matcher.key_fetches <= fetches + 2
    finally:
        await matcher.server.close()


async def test_a_pinned_matcher_key_refuses_another_from_the_url(
    make_node, unused_tcp_port, caplog
):
    url_key = Ed25519PrivateKey.generate()  # what the matcher URL serves, not the pin
    matcher = FakeMatcher(ticket_key=url_key)
    await matcher.server.start_server()
    try:
        node = await make_node(  # pinned to MATCHER_KEY by the fixture
            port=unused_tcp_port,
            matcher=matcher.url,
            public_url=f"http://127.0.0.1:{unused_tcp_port}",
        )
        await wait_for(lambda: matcher.key_fetches >= 2, "the node asks twice")
        assert not matcher.attempts  # it does not register with that matcher
        assert "not the pinned --matcher-key" in caplog.text
        r = await ticketed_job(node, url_key)
        assert r.status == 403 and r.body["error"]["code"] == "ticket_invalid"
        assert (await ticketed_job(node, MATCHER_KEY)).status == 200
    finally:
        await matcher.server.close()
