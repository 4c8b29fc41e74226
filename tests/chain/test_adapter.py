"""The adapter against a scripted toncenter: API key, rate limits, retries, errors."""

from __future__ import annotations

import time

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from contracts.chain.results import ToncenterError
from contracts.chain.toncenter import ToncenterClient, chain_url


@pytest.fixture
async def fake_toncenter():
    state = {"calls": [], "fail_429": 0, "fail_502": 0}

    async def handler(request: web.Request) -> web.Response:
        state["calls"].append((time.monotonic(), request.headers.get("X-API-Key"), request.path))
        if state["fail_429"] > 0:
            state["fail_429"] -= 1
            return web.json_response(
                {"ok": False, "error": "Ratelimit exceed", "code": 429},
                status=429,
                headers={"Retry-After": "0.05"},
            )
        if state["fail_502"] > 0:
            state["fail_502"] -= 1
            return web.Response(status=502, text="<html>bad gateway</html>")
        if request.path.endswith("/getAddressBalance"):
            return web.json_response({"ok": True, "result": "42"})
        return web.json_response(
            {"ok": False, "error": "LITE_SERVER_UNKNOWN: not found", "code": 500}, status=500
        )

    app = web.Application()
    app.router.add_route("*", "/api/v2/{tail:.*}", handler)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    try:
        yield server, state
    finally:
        await server.close()


ADDR = "0:" + "00" * 32


async def test_api_key_header_and_retry_on_429_and_502(fake_toncenter) -> None:
    server, state = fake_toncenter
    state["fail_429"], state["fail_502"] = 2, 1
    url = str(server.make_url("/api/v2"))
    async with ToncenterClient(url, api_key="k-123", max_retries=5) as client:
        assert await client.get_balance(ADDR) == 42
    assert len(state["calls"]) == 4
    assert all(key == "k-123" for _, key, _ in state["calls"])


async def test_gives_up_after_max_retries(fake_toncenter) -> None:
    server, state = fake_toncenter
    state["fail_429"] = 10
    async with ToncenterClient(str(server.make_url("/api/v2")), max_retries=2) as client:
        with pytest.raises(ToncenterError) as err:
            await client.get_balance(ADDR)
    assert err.value.code == 429 and err.value.status == 429
    assert len(state["calls"]) == 3


async def test_errors_are_not_retried_and_carry_code(fake_toncenter) -> None:
    server, state = fake_toncenter
    async with ToncenterClient(str(server.make_url("/api/v2"))) as client:
        with pytest.raises(ToncenterError) as err:
            await client.get_transactions(ADDR)
    assert err.value.code == 500 and "not found" in err.value.message
    assert len(state["calls"]) == 1


async def test_client_side_rate_limit(fake_toncenter) -> None:
    server, state = fake_toncenter
    async with ToncenterClient(str(server.make_url("/api/v2")), rps=10) as client:
        for _ in range(4):
            await client.get_balance(ADDR)
    times = [t for t, _, _ in state["calls"]]
    assert times[-1] - times[0] >= 0.28  # 4 calls at 10/s: at least 3 intervals


async def test_transport_error_is_toncenter_error() -> None:
    from contracts.chain.devnet import free_port

    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    async with ToncenterClient(url, max_retries=1) as client:
        with pytest.raises(ToncenterError) as err:
            await client.get_balance(ADDR)
    assert err.value.code == 0


def test_chain_urls_and_defaults() -> None:
    assert chain_url("devnet") == "http://127.0.0.1:8600"
    assert chain_url("testnet") == "https://testnet.toncenter.com/api/v2"
    assert chain_url("mainnet") == "https://toncenter.com/api/v2"
    assert chain_url("http://x:1/api/v2/") == "http://x:1/api/v2"
    with pytest.raises(ValueError):
        chain_url("moon")
    # keyless toncenter is limited to about 1 request/s; the devnet is not limited
    assert ToncenterClient(chain_url("testnet"))._limiter.interval >= 1.0
    assert ToncenterClient(chain_url("testnet"), api_key="k")._limiter.interval == 0.1
    assert ToncenterClient(chain_url("devnet"))._limiter.interval == 0.0
    assert ToncenterClient(chain_url("mainnet")).testnet is False
