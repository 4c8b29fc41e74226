"""Fixtures: matchers on ephemeral ports with their own database, fake nodes, a session.

The PostgreSQL variant creates one fresh database per test session (dropped after)
and a fresh schema per test; it is skipped, with the reason, only when the server
does not answer.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from marketplace.app import LEDGER, REGISTRY, create_app
from marketplace.config import MatcherConfig
from protocol.api import registration_message
from tests.marketplace.fakes import FakeClient, FakeNode, start_site

PG_DSN = os.environ.get("IMAGO_TEST_PG", "host=127.0.0.1 port=5432 user=postgres dbname=test")


def _pg_params() -> dict[str, str]:
    return dict(part.split("=", 1) for part in PG_DSN.split())


@pytest.fixture(scope="session")
def pg_database() -> str:
    """A fresh PostgreSQL database for this session; its SQLAlchemy URL base."""
    psycopg = pytest.importorskip("psycopg")
    try:
        admin = psycopg.connect(PG_DSN, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as e:
        if os.environ.get("CI"):  # CI must exercise PostgreSQL; scripts/test.sh starts it
            pytest.fail(f"PostgreSQL at {PG_DSN!r} is unreachable: {e}")
        pytest.skip(f"PostgreSQL at {PG_DSN!r} is unreachable: {e}")
    name = f"imago_mkt_{uuid.uuid4().hex[:12]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    params = _pg_params()
    url = (
        f"postgresql+psycopg://{params.get('user', 'postgres')}@"
        f"{params.get('host', '127.0.0.1')}:{params.get('port', '5432')}/{name}"
    )
    yield url
    admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.close()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request, tmp_path: Path) -> str | None:
    """None (SQLite in the state dir) or a PostgreSQL URL with a fresh schema."""
    if request.param == "sqlite":
        yield None
        return
    import psycopg

    base = request.getfixturevalue("pg_database")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    dsn = base.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    yield f"{base}?options=-csearch_path%3D{schema}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {schema} CASCADE")


@dataclass
class RunningMatcher:
    app: web.Application
    runner: web.AppRunner
    url: str
    config: MatcherConfig

    @property
    def ledger(self):
        return self.app[LEDGER]

    @property
    def registry(self):
        return self.app[REGISTRY]

    async def stop(self) -> None:
        await self.runner.cleanup()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
async def start_matcher(tmp_path: Path):
    started: list[RunningMatcher] = []

    async def start(**overrides) -> RunningMatcher:
        fields = {
            "state_dir": tmp_path / "matcher",
            "devnet": True,
            "instance": "test-matcher",
            "status_interval_s": 3600,
            "reattest_interval_s": 3600,
            "first_byte_timeout_s": 2.0,
            **overrides,
        }
        config = MatcherConfig(**fields)
        app = create_app(config)
        runner, url = await start_site(app)
        matcher = RunningMatcher(app, runner, url, config)
        started.append(matcher)
        return matcher

    yield start
    for matcher in started:
        await matcher.stop()


@pytest.fixture
async def start_node():
    nodes: list[FakeNode] = []

    async def start(**kwargs) -> FakeNode:
        node = await FakeNode(**kwargs).start()
        nodes.append(node)
        return node

    yield start
    for node in nodes:
        node.released.set()
        await node.stop()


def signed_registration(node: FakeNode, signed_at: int | None = None) -> dict:
    signed_at = int(time.time()) if signed_at is None else signed_at
    message = registration_message(node.url, node.node_id, signed_at)
    return {
        "url": node.url,
        "ed25519_public": node.node_id,
        "signed_at": signed_at,
        "signature": node.key.sign(message).hex(),
    }


async def admit(session: aiohttp.ClientSession, matcher_url: str, node: FakeNode) -> int:
    async with session.post(f"{matcher_url}/v1/nodes", json=signed_registration(node)) as resp:
        await resp.read()
        return resp.status


@pytest.fixture
def client_for(session):
    def make(matcher: RunningMatcher) -> FakeClient:
        return FakeClient(session, matcher.url)

    return make
