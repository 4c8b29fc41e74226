"""A matcher process that stops with jobs in flight: the records stay consistent.

The matcher runs as a real process (``python -m marketplace serve``). A job hangs on
a fake node; the process is stopped (SIGTERM: graceful; SIGKILL: a crash). Either way
the job ends ``aborted_by_restart`` (at shutdown, or at the next start) and the
counters in /metrics agree with the database.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
from sqlalchemy import create_engine, select

from marketplace.db import JobRecord
from protocol import envelope
from protocol.api import RelayRequest
from protocol.envelope import FrameDecoder
from tests.marketplace.conftest import admit
from tests.marketplace.fakes import ESCROW, MODEL, FakeClient

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MatcherProcess:
    def __init__(self, state_dir: Path, database_url: str | None) -> None:
        self.state_dir = state_dir
        self.database_url = database_url
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    async def start(self, session: aiohttp.ClientSession) -> None:
        args = [
            sys.executable, "-m", "marketplace", "serve", "--devnet",
            "--port", str(self.port), "--state-dir", str(self.state_dir),
            "--instance", "restart-test", "--shutdown-grace", "0.5",
            "--log-file", str(self.state_dir / "matcher.log"),
        ]  # fmt: skip
        if self.database_url:
            args += ["--database-url", self.database_url]
        self.proc = subprocess.Popen(args, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
        for _ in range(600):
            try:
                async with session.get(f"{self.url}/health") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            assert self.proc.poll() is None, (self.state_dir / "matcher.log").read_text()
            await asyncio.sleep(0.05)
        raise AssertionError("the matcher did not start")

    async def stop(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        await asyncio.to_thread(self.proc.wait, 20)
        self.proc = None

    async def ticket_key(self, session: aiohttp.ClientSession) -> str:
        async with session.get(f"{self.url}/v1/ticket-key") as resp:
            return (await resp.json())["ed25519_public"]

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


async def metrics(session, url: str) -> dict[str, int]:
    async with session.get(f"{url}/metrics") as resp:
        text = await resp.text()
    out = {}
    for line in text.splitlines():
        if line.startswith("imago_jobs{"):
            status = line.split('"')[1]
            out[status] = int(line.rsplit(" ", 1)[1])
    return out


def db_counts(url: str) -> dict[str, int]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(select(JobRecord.__table__.c.status)).scalars().all()
    finally:
        engine.dispose()
    counts: dict[str, int] = {}
    for status in rows:
        counts[status] = counts.get(status, 0) + 1
    return counts


async def start_hanging_job(
    session, client: FakeClient, node
) -> tuple[str, aiohttp.ClientResponse]:
    job_id = envelope.new_job_id()
    _, sealed = client.seal([node], "hold on", job_id)
    body = RelayRequest(job_id=job_id.hex(), model=MODEL, escrow=ESCROW.to_str(), sealed=sealed)
    resp = await session.post(f"{client.url}/v1/relay", data=body.model_dump_json())
    decoder = FrameDecoder()
    frames: list = []
    while not frames:
        frames += list(decoder.feed(await resp.content.readany()))
    return job_id.hex(), resp


async def test_restart_aborts_jobs_in_flight(session, start_node, tmp_path, database_url):
    state = tmp_path / "matcher"
    state.mkdir()
    db_url = database_url or f"sqlite:///{state / 'matcher.db'}"
    matcher = MatcherProcess(state, database_url)
    try:
        await matcher.start(session)
        good = await start_node()
        hang = await start_node(mode="hang", models={MODEL: (1000, 1000)})
        client = FakeClient(session, matcher.url)
        for node in (good, hang):
            assert await admit(session, matcher.url, node) == 200
        assert (await client.relay([good])).end is not None
        ticket_key = await matcher.ticket_key(session)

        # A graceful stop (SIGTERM) fails the job in flight itself.
        job_a, resp_a = await start_hanging_job(session, client, hang)
        await matcher.stop(signal.SIGTERM)
        resp_a.close()
        await matcher.start(session)
        counts = db_counts(db_url)
        assert counts == {"completed": 1, "aborted_by_restart": 1}
        assert await matcher.ticket_key(session) == ticket_key  # nodes keep trusting it

        # A crash (SIGKILL) leaves the row in flight; the next start fails it.
        for node in (good, hang):
            assert await admit(session, matcher.url, node) == 200
        job_b, resp_b = await start_hanging_job(session, client, hang)
        assert db_counts(db_url).get("in_flight") == 1  # durable before the node saw it
        await matcher.stop(signal.SIGKILL)
        resp_b.close()
        await matcher.start(session)
        counts = db_counts(db_url)
        assert counts == {"completed": 1, "aborted_by_restart": 2}
        exposed = await metrics(session, matcher.url)
        assert exposed["in_flight"] == 0 and exposed["completed"] == 1
        assert exposed["aborted_by_restart"] == 2
        engine = create_engine(db_url)
        with engine.connect() as conn:
            rows = (
                conn.execute(
                    select(JobRecord.__table__).where(
                        JobRecord.__table__.c.job_id.in_([job_a, job_b])
                    )
                )
                .mappings()
                .all()
            )
        engine.dispose()
        assert {r["status"] for r in rows} == {"aborted_by_restart"}
        assert all(r["finished_at"] for r in rows)
        assert {r["node_id"] for r in rows} == {hang.node_id}  # the node that was streaming

        # The client pays for what the two cut streams delivered, in one voucher: each
        # nanoton lands on its own job, credited to the node that served it.
        resp = await client.post_voucher(7, [(job_a, 3), (job_b, 4)])
        assert resp.status == 200, await resp.text()
        engine = create_engine(db_url)
        with engine.connect() as conn:
            paid = dict(
                conn.execute(
                    select(JobRecord.__table__.c.job_id, JobRecord.__table__.c.amount).where(
                        JobRecord.__table__.c.job_id.in_([job_a, job_b])
                    )
                ).all()
            )
        engine.dispose()
        assert paid == {job_a: 3, job_b: 4}

        # After the restart the matcher re-attests the nodes it knew, by itself, and
        # serves and meters as before.
        for _ in range(300):
            async with session.get(f"{matcher.url}/health") as resp:
                if (await resp.json())["nodes"] == 2:
                    break
            await asyncio.sleep(0.05)
        assert (await client.relay([good])).end is not None
        await asyncio.sleep(0.2)
        assert (await metrics(session, matcher.url))["completed"] == 2
    finally:
        matcher.kill()


def test_taken_port_gives_a_clear_message(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "marketplace", "serve", "--port", str(port),
             "--global-id", "-3", "--state-dir", str(tmp_path / "m")],
            cwd=REPO, capture_output=True, text=True, timeout=60,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )  # fmt: skip
    assert result.returncode == 1
    assert f"port {port} on 127.0.0.1 is taken" in result.stderr
