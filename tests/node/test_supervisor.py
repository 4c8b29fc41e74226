"""The engine supervisor, with the fixture upstream standing in for vLLM (fast)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import aiohttp
import pytest

from node.supervisor import EngineLaunch, Supervisor

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fixture_launch(tmp_path: Path, port: int) -> EngineLaunch:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    argv = [sys.executable, "-m", "tests.node.fixture_upstream", str(port)]
    return EngineLaunch(argv, env, port, tmp_path / "logs" / "engine.log", "fixture")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError):  # a zombie is dead for our purposes
        if Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "Z":
            return False
    return True


async def _wait(predicate, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError
        await asyncio.sleep(0.05)


async def test_supervisor_starts_restarts_and_stops(tmp_path):
    async with aiohttp.ClientSession() as session:
        sup = Supervisor(_fixture_launch(tmp_path, _free_port()), session, backoff_initial=0.1)
        task = asyncio.create_task(sup.run())
        try:
            await asyncio.wait_for(sup.ready.wait(), 30)
            first = sup.pid
            assert sup.starts == 1 and sup.last_start_seconds is not None
            os.killpg(first, signal.SIGKILL)
            await _wait(lambda: sup.starts == 2 and sup.ready.is_set(), 30)
            assert sup.pid != first
            assert "starting engine" in (tmp_path / "logs" / "engine.log").read_text()
        finally:
            pid = sup.pid
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        assert not _alive(pid)
        assert not sup.ready.is_set()


async def test_supervisor_refuses_a_taken_port(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        async with aiohttp.ClientSession() as session:
            sup = Supervisor(_fixture_launch(tmp_path, port), session, backoff_initial=5)
            task = asyncio.create_task(sup.run())
            await _wait(lambda: sup.last_error is not None, 10)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    assert "port" in sup.last_error and "taken" in sup.last_error
    assert sup.starts == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux")
async def test_engine_dies_with_a_killed_node(tmp_path):
    """SIGKILL to the node (no cleanup) still takes its engine down."""
    port, pidfile = _free_port(), tmp_path / "engine.pid"
    script = textwrap.dedent(f"""
        import asyncio, os, sys
        from pathlib import Path
        import aiohttp
        sys.path.insert(0, {str(ROOT)!r})
        from node.supervisor import EngineLaunch, Supervisor
        async def main():
            env = dict(os.environ, PYTHONPATH={str(ROOT)!r})
            argv = [sys.executable, "-m", "tests.node.fixture_upstream", "{port}"]
            launch = EngineLaunch(argv, env, {port}, Path({str(tmp_path)!r}) / "e.log", "fx")
            async with aiohttp.ClientSession() as s:
                sup = Supervisor(launch, s)
                asyncio.create_task(sup.run())
                await sup.ready.wait()
                Path({str(pidfile)!r}).write_text(str(sup.pid))
                await asyncio.sleep(600)
        asyncio.run(main())
    """)
    parent = subprocess.Popen([sys.executable, "-c", script])
    try:
        await _wait(lambda: pidfile.exists() and pidfile.read_text().strip(), 30)
        engine = int(pidfile.read_text())
        assert _alive(engine)
        parent.kill()
        parent.wait()
        await _wait(lambda: not _alive(engine), 10)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if pidfile.exists() and pidfile.read_text().strip():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(int(pidfile.read_text()), signal.SIGKILL)


async def test_supervisor_restarts_a_hung_engine(tmp_path):
    async with aiohttp.ClientSession() as session:
        sup = Supervisor(
            _fixture_launch(tmp_path, _free_port()), session,
            backoff_initial=0.1, health_interval=0.2, unhealthy_limit=3, health_timeout=0.5,
        )  # fmt: skip
        task = asyncio.create_task(sup.run())
        try:
            await asyncio.wait_for(sup.ready.wait(), 30)
            hung = sup.pid
            os.killpg(hung, signal.SIGSTOP)  # alive, but answers nothing
            await _wait(lambda: sup.starts == 2 and sup.ready.is_set(), 60)
            assert not _alive(hung)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
