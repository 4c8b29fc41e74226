"""Dev attestations only on the devnet: a matcher given ``--devnet`` and a chain that
is not the Imago devnet refuses to start (the positive case, ``--devnet`` on the real
devnet, runs in tests/contracts/test_matcher_allowlists.py and tests/e2e)."""

from __future__ import annotations

import asyncio
import socket
import sys
from pathlib import Path

import pytest
from aiohttp import web

from contracts.chain.devnet import is_devnet
from marketplace.app import StartupRefused, create_app
from marketplace.config import MatcherConfig

ROOT = Path(__file__).resolve().parents[2]


async def _not_a_devnet() -> tuple[web.AppRunner, str]:
    """A toncenter-like server: it answers the v2 API, not /devnet/health."""

    async def masterchain_info(_: web.Request) -> web.Response:
        return web.json_response({"ok": True, "result": {"last": {"seqno": 1}}})

    app = web.Application()
    app.router.add_get("/getMasterchainInfo", masterchain_info)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}"


async def test_a_chain_that_is_not_the_devnet_is_not_one() -> None:
    runner, url = await _not_a_devnet()
    try:
        assert not await is_devnet(url)
        assert not await is_devnet("http://127.0.0.1:9")  # nothing listens
    finally:
        await runner.cleanup()


async def test_devnet_mode_against_another_chain_refuses_to_start(tmp_path: Path) -> None:
    runner, url = await _not_a_devnet()
    config = MatcherConfig(state_dir=tmp_path / "matcher", devnet=True, chain_url=url)
    matcher = web.AppRunner(create_app(config))
    try:
        with pytest.raises(StartupRefused, match="only the Imago devnet"):
            await matcher.setup()
    finally:
        await matcher.cleanup()
        await runner.cleanup()


async def test_the_cli_says_why_and_exits_2(tmp_path: Path) -> None:
    runner, url = await _not_a_devnet()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "imago.cli", "matcher", "serve", "--devnet",
            "--chain", url, "--port", str(port), "--state-dir", str(tmp_path / "matcher"),
            cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, err = await asyncio.wait_for(process.communicate(), timeout=60)
    finally:
        await runner.cleanup()
    assert process.returncode == 2
    assert "only the Imago devnet" in err.decode()
    assert "Traceback" not in err.decode()


async def test_off_the_devnet_the_network_is_no_default(tmp_path: Path) -> None:
    """Vouchers and receipts name their network: a matcher that is neither on the devnet
    nor told (or able to read from its chain) which network it serves does not start."""
    config = MatcherConfig(state_dir=tmp_path / "matcher", devnet=False)
    matcher = web.AppRunner(create_app(config))
    try:
        with pytest.raises(StartupRefused, match="global id"):
            await matcher.setup()
    finally:
        await matcher.cleanup()
