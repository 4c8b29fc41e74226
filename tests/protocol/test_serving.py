"""protocol.serving: the limits every server runs under, on a real aiohttp server."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from protocol.errors import error_middleware
from protocol.serving import LIMITS, ServerLimits, read_body, read_json

LIMITS_UNDER_TEST = ServerLimits(idle_timeout_s=1.0, body_timeout_s=0.5, max_body_bytes=300_000)


async def _echo(request: web.Request) -> web.Response:
    return web.Response(body=await read_body(request))


async def _json(request: web.Request) -> web.Response:
    return web.json_response(await read_json(request))


@pytest.fixture
async def server() -> AsyncIterator[tuple[str, int]]:
    app = web.Application(
        middlewares=[error_middleware()], client_max_size=LIMITS_UNDER_TEST.max_body_bytes
    )
    app[LIMITS] = LIMITS_UNDER_TEST
    app.router.add_post("/echo", _echo)
    app.router.add_post("/json", _json)
    runner = web.AppRunner(app, access_log=None, **LIMITS_UNDER_TEST.runner_kwargs())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    yield host, port
    await runner.cleanup()


async def _exchange(
    addr: tuple[str, int], head: bytes, body_parts: tuple[bytes, ...] = (), gap: float = 0.0
) -> bytes:
    reader, writer = await asyncio.open_connection(*addr)
    writer.write(head)
    for part in body_parts:
        await asyncio.sleep(gap)
        writer.write(part)
        await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return answer


async def test_an_oversized_header_gets_a_4xx_and_one_warning_line(
    server: tuple[str, int], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    head = b"POST /echo HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n"
    answer = await _exchange(server, head)
    status = int(answer.split(b" ", 2)[1])
    assert 400 <= status < 500, answer[:200]
    records = [r for r in caplog.records if r.name.startswith(("imago.http", "aiohttp"))]
    assert len(records) == 1, [r.getMessage() for r in records]
    assert records[0].levelno == logging.WARNING
    assert records[0].exc_info is None and "Traceback" not in caplog.text


async def test_a_slow_body_gets_408(server: tuple[str, int]) -> None:
    head = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n"
    answer = await _exchange(server, head, (b"a", b"b"), gap=0.4)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b'"code":"body_timeout"' in answer.replace(b" ", b"")


async def test_a_body_over_the_cap_gets_413(server: tuple[str, int]) -> None:
    head = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 400000\r\n\r\n"
    answer = await _exchange(server, head, (b"a" * 400_000,))
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]


async def test_a_connection_that_never_completes_its_head_is_closed(
    server: tuple[str, int],
) -> None:
    reader, writer = await asyncio.open_connection(*server)
    writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
    started = asyncio.get_running_loop().time()
    assert await asyncio.wait_for(reader.read(), 10) == b""
    assert asyncio.get_running_loop().time() - started < 5
    writer.close()


async def test_a_body_within_the_limits_is_read(server: tuple[str, int]) -> None:
    head = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\n"
    answer = await _exchange(server, head, (b"hello",))
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"hello")


async def test_json_nested_too_deeply_gets_400(server: tuple[str, int]) -> None:
    body = b"[" * 100_000 + b"]" * 100_000
    head = b"POST /json HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
    head += b"Content-Length: %d\r\n\r\n" % len(body)
    answer = await _exchange(server, head, (body,))
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert b'"code":"invalid_json"' in answer.replace(b" ", b"")
