"""`imago gateway` and `imago chat` as real processes, against the fake matcher
(and, where the gateway reads its escrow on-chain, the real devnet)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
from pathlib import Path

import aiohttp
import pytest

from client.keys import load_or_create_spend_key
from contracts.chain import getters, operations
from imago import stack as imago_stack
from protocol.attestation import DEV_MEASUREMENT, image_hash
from tests.client.client_fakes import FakeMatcher
from tests.contracts import conftest as chain_fixtures

ROOT = Path(__file__).resolve().parents[2]

# The session devnet with a deployed Registry and Vault (tests/contracts/conftest.py).
devnet = chain_fixtures.devnet
chain = chain_fixtures.chain
make_wallet = chain_fixtures.make_wallet
contracts_set = chain_fixtures.contracts_set


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def run(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "imago.cli",
        *args,
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    except TimeoutError:
        proc.kill()  # e.g. a gateway that serves where it should have refused to start
        await proc.wait()
        pytest.fail(f"`imago {' '.join(args)}` did not exit")
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
        "imago.cli",
        "gateway",
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
        code, _, err = await run(env, "gateway", "--port", str(port))
        assert code == 2 and "is taken" in err
        # a gateway other machines can reach must have an API key
        code, _, err = await run(env, "gateway", "--host", "0.0.0.0", "--port", "0")
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
        env, "gateway", "--devnet", "--chain", nothing, "--port", str(free_port())
    )
    assert code == 2 and "only the Imago devnet" in err
    code, _, err = await run(env, "gateway", "--devnet", "--registry", "0:" + "44" * 32)
    assert code == 2 and "--registry needs --chain" in err


async def start_gateway(env: dict[str, str], port: int, *args: str) -> asyncio.subprocess.Process:
    """`imago gateway` in the background; returns once /health answers."""
    server = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "imago.cli", "gateway", *args,
        cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    async with aiohttp.ClientSession() as session:
        for _ in range(400):
            if server.returncode is not None:
                break
            try:
                async with session.get(f"http://127.0.0.1:{port}/health") as resp:
                    if resp.status == 200:
                        return server
            except aiohttp.ClientError:
                await asyncio.sleep(0.05)
    out = await server.stdout.read() if server.returncode is not None else b""
    server.kill()
    await server.wait()
    pytest.fail(f"the gateway did not start: {out.decode()}")


def fake_launch(
    monkeypatch: pytest.MonkeyPatch, home: Path, chain_url: str, on_chain: dict[str, str]
) -> None:
    """Run `imago up`'s real `launch` with every process and chain step replaced by a
    fake that only fills the state it would have written."""

    def fake_start_devnet(launcher: imago_stack.StackLauncher) -> None:
        launcher.state.chain_url = chain_url

    def fake_setup_chain(launcher: imago_stack.StackLauncher) -> None:
        for key, value in on_chain.items():
            setattr(launcher.state, key, value)

    monkeypatch.setattr(imago_stack, "start_devnet", fake_start_devnet)
    monkeypatch.setattr(imago_stack, "setup_chain", fake_setup_chain)
    monkeypatch.setattr(imago_stack, "register_provider", lambda launcher: None)
    monkeypatch.setattr(imago_stack, "allow_on_registry", lambda launcher, stop: None)
    monkeypatch.setattr(imago_stack, "http_json", lambda url: {"data": [{"id": "fake-model"}]})
    monkeypatch.setattr(imago_stack.StackLauncher, "spawn", lambda self, name, args, ready: None)
    monkeypatch.setattr(imago_stack.StackLauncher, "wait", lambda self, name, proc, ready: None)


async def test_serve_by_hand_next_to_imago_up(
    fake_matcher: tuple[FakeMatcher, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    devnet,
    chain,
    contracts_set,
    make_wallet,
) -> None:
    """`imago gateway` with no flags, in the home `imago up` wrote, is the stack's
    gateway: devnet (dev attestations), chain, Registry and escrow from stack.json."""
    matcher, matcher_url = fake_matcher
    home = tmp_path / "home"
    spend = load_or_create_spend_key(home / "client" / "spend.key")
    spend_public = spend.public_key().public_bytes_raw()
    owner = await make_wallet()
    vault_data = await getters.get_vault_data(chain, contracts_set.vault)
    escrow, _ = await operations.escrow_open(
        owner, contracts_set.vault, spend_public, 2 * chain_fixtures.TON,
        vault_data.escrow_close_delay,
    )  # fmt: skip
    # the node (a fake, dev-attested) runs the dev image, which the stack's Registry allows
    await operations.allow_image(
        contracts_set.gov, contracts_set.registry, image_hash(DEV_MEASUREMENT)
    )
    raw = {
        "registry": contracts_set.registry.to_str(is_user_friendly=False),
        "vault": contracts_set.vault.to_str(is_user_friendly=False),
        "escrow": escrow.to_str(is_user_friendly=False),
    }
    port = free_port()
    ports = {
        "devnet": int(devnet.url.rsplit(":", 1)[1]),
        "matcher": int(matcher_url.rsplit(":", 1)[1]),
        "node": free_port(),
        "gateway": port,
    }
    fake_launch(monkeypatch, home, devnet.url, raw)
    launcher = imago_stack.StackLauncher(home, "127.0.0.1", ports, quiet=True)
    imago_stack.launch(launcher, argparse.Namespace(upstream="http://127.0.0.1:9"))
    state = json.loads((home / "stack.json").read_text())
    assert state["devnet"] is True
    assert (state["chain_url"], state["registry"], state["escrow"]) == (
        devnet.url,
        raw["registry"],
        raw["escrow"],
    )
    assert state["matcher_url"] == matcher_url

    env = {**os.environ, "IMAGO_HOME": str(home)}
    env.pop("IMAGO_SPEND_PASSPHRASE", None)
    server = await start_gateway(env, port)
    try:
        code, out, err = await run(env, "chat", "What is the capital of France?", "--no-stream")
        assert code == 0, err  # a dev-attested node: the gateway knows it is on the devnet
        assert out.splitlines()[0] == "Paris is the capital of France ."
    finally:
        server.terminate()
        output = (await asyncio.wait_for(server.communicate(), 10))[0].decode()
    assert "(devnet)" in output and f"registry {raw['registry']}" in output
    assert spend_public.hex() in output
    assert matcher.latest[raw["escrow"]] > 0  # paid from the escrow on the devnet

    # another spend key (another state dir) than the one the escrow names: refused
    code, _, err = await run(
        env, "gateway", "--state-dir", str(tmp_path / "other"), "--port", str(free_port())
    )
    other = load_or_create_spend_key(tmp_path / "other" / "spend.key")
    assert code == 2, err
    assert spend_public.hex() in err and other.public_key().public_bytes_raw().hex() in err
    # an escrow that is not deployed, or that pays another vault: refused
    nowhere = "0:" + "44" * 32
    code, _, err = await run(env, "gateway", "--escrow", nowhere, "--port", "0")
    assert code == 2 and f"escrow {nowhere} is not deployed" in err
    code, _, err = await run(env, "gateway", "--vault", "0:" + "7a" * 32, "--port", "0")
    assert code == 2 and f"pays vault {raw['vault']}" in err


async def test_serve_refuses_an_escrow_it_cannot_read(tmp_path: Path) -> None:
    env = {**os.environ, "IMAGO_HOME": str(tmp_path)}
    nothing = f"http://127.0.0.1:{free_port()}"  # no chain answers there
    escrow = "0:" + "e5" * 32
    code, _, err = await run(
        env, "gateway", "--chain", nothing, "--escrow", escrow,
        "--vault", "0:" + "7a" * 32, "--port", str(free_port()),
    )  # fmt: skip
    assert code == 2 and f"cannot read escrow {escrow} from the chain at {nothing}" in err
    # with a chain, there is no placeholder escrow: it could only be refused
    code, _, err = await run(env, "gateway", "--chain", nothing, "--port", "0")
    assert code == 2 and "give --escrow and --vault" in err


async def test_serve_refuses_a_malformed_origin(tmp_path: Path) -> None:
    env = {**os.environ, "IMAGO_HOME": str(tmp_path)}
    code, _, err = await run(
        env, "gateway", "--devnet", "--allow-origin", "localhost:3000", "--port", "0"
    )
    assert code == 2 and "--allow-origin" in err and "scheme://host" in err
