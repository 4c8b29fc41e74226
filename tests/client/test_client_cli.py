"""`imago client serve` and `imago chat` as real processes, against the fake matcher."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
from pathlib import Path

import aiohttp

from tests.client.client_fakes import FakeMatcher

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def run(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "client.cli",
        *args,
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_serve_and_chat(fake_matcher: tuple[FakeMatcher, str], tmp_path: Path) -> None:
    matcher, matcher_url = fake_matcher
    port = free_port()
    env = {**os.environ, "IMAGO_HOME": str(tmp_path)}
    (tmp_path / "stack.json").write_text(
        json.dumps(
            {
                "matcher_url": matcher_url,
                "gateway_url": f"http://127.0.0.1:{port}/v1",
                "escrow": "0:" + "e5" * 32,
                "vault": "0:" + "7a" * 32,
                "model": "fake-model",
                "devnet": True,
            }
        )
    )
    server = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "client.cli",
        "client",
        "serve",
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(200):
                try:
                    async with session.get(f"http://127.0.0.1:{port}/health") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.05)
        # a taken port gives a clear message
        code, _, err = await run(env, "client", "serve", "--port", str(port))
        assert code == 2 and "is taken" in err
        # a gateway other machines can reach must have an API key
        code, _, err = await run(env, "client", "serve", "--host", "0.0.0.0", "--port", "0")
        assert code == 2 and "--api-key" in err

        code, out, err = await run(env, "chat", "What is the capital of France?")
        assert code == 0, err
        lines = out.splitlines()
        assert lines[0] == "Paris is the capital of France ."
        assert "6 prompt + 7 completion tokens" in lines[1] and "TON" in lines[1]

        code, out, err = await run(env, "chat", "Capital?", "--no-stream", "--max-tokens", "2")
        assert code == 0, err
        assert out.splitlines()[0] == "Paris is"

        code, out, err = await run(env, "chat", "Capital?", "--model", "nope")
        assert code == 1 and "404" in err
        assert (tmp_path / "client" / "spend.key").stat().st_mode & 0o777 == 0o600
    finally:
        server.terminate()
        await asyncio.wait_for(server.wait(), 10)
    # the gateway flushed its vouchers when it stopped
    assert matcher.latest["0:" + "e5" * 32] > 0
    ledgers = list((tmp_path / "client").glob("spend-*.json"))
    assert len(ledgers) == 1 and json.loads(ledgers[0].read_text())["pending_jobs"] == []


async def test_chat_without_gateway(tmp_path: Path) -> None:
    env = {**os.environ, "IMAGO_HOME": str(tmp_path)}
    code, _, err = await run(
        env, "chat", "hi", "--gateway", f"http://127.0.0.1:{free_port()}", "--model", "m"
    )
    assert code == 1 and "cannot reach the gateway" in err


async def test_serve_refuses_dev_attestations_on_a_chain_that_is_not_the_devnet(
    tmp_path: Path,
) -> None:
    env = {**os.environ, "IMAGO_HOME": str(tmp_path)}
    nothing = f"http://127.0.0.1:{free_port()}"  # no devnet answers there
    code, _, err = await run(
        env, "client", "serve", "--devnet", "--chain", nothing, "--port", str(free_port())
    )
    assert code == 2 and "only the Imago devnet" in err
    code, _, err = await run(env, "client", "serve", "--devnet", "--registry", "0:" + "44" * 32)
    assert code == 2 and "--registry needs --chain" in err
