"""The node registers with its matcher, retries, and re-registers when forgotten."""

from __future__ import annotations

import asyncio
import os

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from contracts.protocol.api import AttestationDoc, NodeRegistration
from contracts.protocol.attestation import AttestationPolicy, verify_attestation


class FakeMatcher:
    """FIXTURE: a matcher that attests a registering node with its own nonce."""

    def __init__(self, refuse_first: int = 0) -> None:
        self.refuse_first = refuse_first
        self.attempts = 0
        self.registered: list[NodeRegistration] = []
        app = web.Application()
        app.router.add_post("/v1/nodes", self._register)
        self.server = TestServer(app)

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
            matcher=str(matcher.server.make_url("")).rstrip("/"),
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
