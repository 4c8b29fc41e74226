"""`imago devnet` and `imago wallet` end to end, in a temp IMAGO_HOME on a free port."""

from __future__ import annotations

import argparse
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from contracts.chain import devnet_cli
from contracts.chain.devnet import free_port, read_status, stop_background

REPO = Path(__file__).resolve().parents[2]


def imago(home: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "IMAGO_HOME": str(home), **(env or {})}
    full_env.pop("IMAGO_CHAIN", None)
    return subprocess.run(
        [sys.executable, "-m", "imago.cli", *args],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
    )


class InProcess:
    """The same commands without a new interpreter (the CLI imports every party: slow)."""

    def __init__(self, home: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
        self.home, self.monkeypatch, self.capsys = home, monkeypatch, capsys

    def __call__(self, *args: str, env: dict | None = None) -> subprocess.CompletedProcess[str]:
        parser = argparse.ArgumentParser(prog="imago")
        devnet_cli.register(parser.add_subparsers(dest="command", required=True))
        with self.monkeypatch.context() as m:
            m.setenv("IMAGO_HOME", str(self.home))
            m.delenv("IMAGO_CHAIN", raising=False)
            for k, v in (env or {}).items():
                m.setenv(k, v)
            self.capsys.readouterr()
            ns = parser.parse_args(list(args))
            rc = int(ns.func(ns) or 0)
            out = self.capsys.readouterr()
        return subprocess.CompletedProcess(list(args), rc, out.out, out.err)


@pytest.fixture
def home(tmp_path: Path):
    h = tmp_path / "imago-home"
    yield h
    stop_background(h / "devnet")  # never leave a devnet behind


def test_devnet_and_wallet_commands(home: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    inproc = InProcess(home, monkeypatch, capsys)
    port = free_port()
    r = imago(home, "devnet", "up", "--port", str(port), "--json")
    assert r.returncode == 0, r.stderr
    up = json.loads(r.stdout)
    assert up["port"] == port and up["url"] == f"http://127.0.0.1:{port}"
    assert read_status(home / "devnet").running

    r = imago(home, "devnet", "status", "--json")
    st = json.loads(r.stdout)
    assert r.returncode == 0 and st["running"] and st["pid"] == up["pid"] and st["seqno"] >= 1
    r = inproc("devnet", "status")
    assert "masterchain seqno" in r.stdout and str(port) in r.stdout

    # a second devnet from the same home is refused; another home on the same port too
    r = inproc("devnet", "up", "--port", str(port))
    assert r.returncode == 1 and "already runs" in r.stderr
    other = tmp_path / "other-home"
    r = InProcess(other, monkeypatch, capsys)("devnet", "up", "--port", str(port))
    assert r.returncode == 1 and f"port {port} is already in use" in r.stderr
    assert not read_status(other / "devnet").running

    # wallets: new (plain and encrypted), show, faucet, balance, send
    r = imago(home, "wallet", "new", "--json")
    assert r.returncode == 0, r.stderr
    new = json.loads(r.stdout)
    keystore = home / "wallets" / "default.json"
    assert Path(new["file"]) == keystore and stat.S_IMODE(keystore.stat().st_mode) == 0o600
    assert new["address"].startswith("0Q")  # testnet flag, non-bounceable
    r = inproc("wallet", "new")
    assert r.returncode == 1 and "refusing to overwrite" in r.stderr

    r = inproc("wallet", "show", "--json")
    shown = json.loads(r.stdout)
    assert shown["address"] == new["address"] and shown["encrypted"] is False

    r = imago(home, "wallet", "faucet", "3", "--json")
    assert r.returncode == 0, r.stderr
    fau = json.loads(r.stdout)
    assert fau["amount"] == "3" and fau["balance_nanoton"] == 3_000_000_000

    r = imago(home, "wallet", "balance", "--json")
    bal = json.loads(r.stdout)
    assert bal["balance"] == "3" and bal["state"] == "uninitialized"
    r = inproc("wallet", "balance")
    assert r.stdout.startswith("3 TON")

    dest = "0:" + "ab" * 32
    r = inproc("wallet", "send", dest, "1.25", "--comment", "hi", "--json")
    assert r.returncode == 0, r.stderr
    sent = json.loads(r.stdout)
    assert sent["amount_nanoton"] == 1_250_000_000 and len(sent["transactions"]) == 2
    assert sent["transactions"][0]["success"] and sent["total_gas_used"] > 0
    assert "waiting for confirmation" in r.stderr  # progress goes to stderr
    bal = json.loads(inproc("wallet", "balance", "--json").stdout)
    assert bal["state"] == "active" and 1.7 < float(bal["balance"]) < 1.75

    env = {"PP": "s3cret"}
    r = inproc("wallet", "new", "--name", "enc", "--passphrase-env", "PP", env=env)
    assert r.returncode == 0 and "encrypted" in r.stdout
    assert inproc("wallet", "faucet", "--name", "enc").returncode == 0
    r = inproc(
        "wallet",
        "send",
        "--name",
        "enc",
        "--passphrase-env",
        "PP",
        dest,
        "1",
        env={"PP": "nope"},
    )
    assert r.returncode == 1 and "wrong passphrase" in r.stderr
    r = inproc("wallet", "send", "--name", "enc", dest, "1")
    assert r.returncode == 1 and "passphrase" in r.stderr
    r = inproc("wallet", "send", "--name", "enc", "--passphrase-env", "PP", dest, "1", env=env)
    assert r.returncode == 0, r.stderr

    r = inproc("wallet", "send", dest, "lots")
    assert r.returncode == 1 and "not a TON amount" in r.stderr
    r = inproc("wallet", "faucet", "--chain", "testnet")
    assert r.returncode == 1 and "only on the devnet" in r.stderr

    r = imago(home, "devnet", "down", "--json")
    assert json.loads(r.stdout) == {"stopped": True}
    r = imago(home, "devnet", "status", "--json")
    assert r.returncode == 3 and json.loads(r.stdout)["running"] is False
    assert (home / "devnet" / "state.json").exists()

    # up again: the state was kept
    port2 = free_port()
    assert inproc("devnet", "up", "--port", str(port2)).returncode == 0
    bal2 = json.loads(inproc("wallet", "balance", "--json").stdout)
    assert bal2["balance_nanoton"] == bal["balance_nanoton"]
