"""README.md's "On-chain roles with the CLI", as a new user follows it.

Every ``sh`` block of that section runs literally (through bash, with ``imago`` on the
PATH) in a fresh ``IMAGO_HOME`` on a devnet of its own. Between the first block (set-up)
and the rest (closing up), the three services the section describes start from that
state with no key flag: a matcher for the deployed Vault and Registry, a node in front
of the fixture upstream (no model needed; dev attestation), and the gateway. One
request goes through the official ``openai`` package and must be served by the node
key the README staked, paid from the escrow it opened.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import openai
import pytest
from aiohttp import web
from pytoniq_core import Address

from contracts.chain.devnet import stop_background
from tests.node.fixture_upstream import ANSWER, FixtureOptions, create_fixture_upstream

ROOT = Path(__file__).resolve().parents[2]
MODEL = "SmolLM2-135M-Instruct"  # the model the README registers and allows


def readme_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## On-chain roles with the CLI", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.*?)```", section, flags=re.S)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A fresh IMAGO_HOME and an ``imago`` command on the PATH (this checkout's)."""
    h = tmp_path / "imago-home"
    h.mkdir()
    yield h
    stop_background(h / "devnet")  # never leave a devnet behind


@pytest.fixture
def env(home: Path, tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    imago = bin_dir / "imago"
    imago.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m imago.cli "$@"\n')
    imago.chmod(0o755)
    e = {
        **os.environ,
        "IMAGO_HOME": str(home),
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(ROOT),
        # a free port rather than 8600, which a running `imago up` may hold
        "IMAGO_DEVNET_PORT": str(free_port()),
    }
    for name in ("IMAGO_CHAIN", "TONCENTER_API_KEY", "IMAGO_SPEND_PASSPHRASE"):
        e.pop(name, None)
    return e


async def run_block(block: str, env: dict[str, str]) -> str:
    proc = await asyncio.create_subprocess_exec(
        "bash", "-e", "-c", block, cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out = (await asyncio.wait_for(proc.communicate(), 300))[0].decode()
    assert proc.returncode == 0, f"README block failed:\n{block}\n--- output\n{out}"
    return out


async def imago_json(env: dict[str, str], *args: str) -> dict:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "imago.cli", *args, "--json", cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()
    return json.loads(out.decode().splitlines()[-1])


class Services:
    """The long-running commands, each a process with its output in a log file."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env, self.logs = env, logs
        self.procs: dict[str, asyncio.subprocess.Process] = {}
        logs.mkdir(exist_ok=True)

    async def start(self, name: str, *args: str) -> None:
        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 (the process keeps it)
        self.procs[name] = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "imago.cli", *args, cwd=ROOT, env=self.env,
            stdout=log, stderr=asyncio.subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        log.close()

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")[-4000:]

    async def wait_for(self, name: str, probe, timeout: float = 60) -> None:
        """Until ``await probe()`` is true; fails with the log if the process exits."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not await probe():
            if self.procs[name].returncode is not None:
                pytest.fail(f"{name} exited with {self.procs[name].returncode}:\n{self.log(name)}")
            if loop.time() > deadline:
                pytest.fail(f"{name} not ready in {timeout} s:\n{self.log(name)}")
            await asyncio.sleep(0.2)

    async def stop(self, name: str) -> None:
        proc = self.procs.pop(name)
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 20)
            except TimeoutError:
                proc.kill()
                await proc.wait()

    async def stop_all(self) -> None:
        for name in reversed(list(self.procs)):
            await self.stop(name)


async def http_json(session: aiohttp.ClientSession, url: str) -> dict | None:
    try:
        async with session.get(url) as r:
            return await r.json() if r.status == 200 else None
    except (aiohttp.ClientError, ValueError):
        return None


@pytest.fixture
async def upstream() -> AsyncIterator[str]:
    """The fixture upstream, serving the README's model id."""
    runner = web.AppRunner(create_fixture_upstream(FixtureOptions(model=MODEL)))
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def test_readme_on_chain_roles(
    home: Path, env: dict[str, str], upstream: str, tmp_path: Path
) -> None:
    blocks = readme_blocks()
    assert len(blocks) == 2, "the section has a set-up block and a closing-up block"
    setup, *closing = blocks
    await run_block(setup, env)

    # what the README made, read back the way a user would
    deployment = json.loads((home / "deployment.json").read_text())
    registry, vault = deployment["registry"], next(iter(deployment["vaults"].values()))
    chain = (await imago_json(env, "devnet", "status"))["url"]
    provider = await imago_json(env, "provider", "status")
    escrow = await imago_json(env, "escrow", "status")
    assert provider["state"] == "active" and escrow["state"] == "open"

    ports = {name: free_port() for name in ("matcher", "node", "gateway")}
    matcher_url = f"http://127.0.0.1:{ports['matcher']}"
    services = Services(env, tmp_path / "logs")
    try:
        async with aiohttp.ClientSession() as http:
            await services.start(
                "matcher", "matcher", "serve", "--devnet", "--port", str(ports["matcher"]),
                "--chain", chain, "--registry", registry, "--vault", vault,
            )  # fmt: skip
            await services.wait_for("matcher", lambda: http_json(http, f"{matcher_url}/health"))
            # no key flag: the node signs with the key `provider register` staked, and
            # names the Provider it recorded
            await services.start(
                "node", "node", "serve", "--devnet", "--port", str(ports["node"]),
                "--matcher", matcher_url, "--upstream", upstream,
            )  # fmt: skip

            async def admitted() -> bool:
                models = await http_json(http, f"{matcher_url}/v1/models")
                return bool(models and models["data"])

            await services.wait_for("node", admitted, timeout=90)
            # no key, escrow or vault flag: the gateway pays from the escrow `escrow
            # open` recorded for its spend key
            await services.start(
                "gateway", "gateway", "--devnet", "--port", str(ports["gateway"]),
                "--matcher", matcher_url, "--chain", chain, "--registry", registry,
            )  # fmt: skip
            gateway_url = f"http://127.0.0.1:{ports['gateway']}/v1"
            await services.wait_for("gateway", lambda: http_json(http, f"{gateway_url}/models"))

        client = openai.AsyncOpenAI(base_url=gateway_url, api_key="imago", max_retries=0)
        reply = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            temperature=0,
        )
        await client.close()
        assert reply.choices[0].message.content == ANSWER
        usage = reply.usage.model_extra
        assert usage["cost_nanoton"] > 0
        assert usage["imago_receipt"]["node"] == provider["node_key"]  # the staked key
        # it started (with a chain, only if the escrow names its spend key and pays the
        # vault) on the escrow the README opened
        announced = re.search(r"escrow (\S+)\s+spend key", services.log("gateway"))
        assert announced and Address(announced[1]) == Address(escrow["escrow"])
    finally:
        await services.stop_all()

    for block in closing:
        await run_block(block, env)
    escrow = await imago_json(env, "escrow", "status")
    provider = await imago_json(env, "provider", "status")
    assert escrow["state"] == "closed" and provider["state"] == "unbonding"
