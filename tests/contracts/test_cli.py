"""The README flow through the `imago` CLI, on a devnet of its own."""

from __future__ import annotations

import json
import time

import pytest
from pytoniq_core import Address

from client.keys import load_spend_key
from contracts.chain.devnet import DevnetProcess
from imago.cli import main
from node.keys import load_or_create_keys, recorded_provider
from protocol import home
from protocol.attestation import DEV_MEASUREMENT, image_hash


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory, monkeypatch_module):
    home_dir = tmp_path_factory.mktemp("imago-home")
    monkeypatch_module.setenv("IMAGO_HOME", str(home_dir))
    with DevnetProcess(tmp_path_factory.mktemp("cli-devnet"), port=0) as dn:
        yield dn.url


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def imago(capsys, *argv: str) -> dict:
    capsys.readouterr()
    code = main([*argv])
    captured = capsys.readouterr()
    out = captured.out
    assert code == 0, out + captured.err
    lines = [line for line in out.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


def test_readme_flow(cli_env, capsys):
    chain = ["--chain", cli_env, "--json"]
    imago(capsys, "wallet", "new", *chain)
    imago(capsys, "wallet", "faucet", "300", *chain)
    dep = imago(
        capsys, "registry", "deploy", "--all", "--escrow-close-delay", "3", "--vault-stake", "20",
        *chain,
    )  # fmt: skip
    assert dep["vault"] and dep["registry"]
    status = imago(capsys, "registry", "status", *chain)
    assert all(status["code_matches_build"].values())
    imago(capsys, "registry", "allow-model", "smollm2", *chain)

    p = imago(capsys, "provider", "register", "--stake", "12", "--model", "smollm2:100:200", *chain)
    assert p["state"] == "active" and p["stake"] == "12"
    # the key staked is the node's own (made as `imago node serve` would), and the
    # Provider is recorded beside it for `node serve`
    assert p["node_keystore"] == str(home.node_keystore())
    assert load_or_create_keys(home.node_keystore()).ed25519_public.hex() == p["node_key"]
    assert Address(recorded_provider(home.node_dir())) == Address(p["provider"])
    p = imago(capsys, "provider", "status", *chain)
    assert p["capabilities"]["models"][0]["price_prompt"] == 100

    e = imago(capsys, "escrow", "open", "--amount", "5", *chain)
    assert (
        e["state"] == "open" and float(e["deposited"]) > 4.89
    )  # 5 TON but the 0.1 TON storage reserve and gas
    # paid from the gateway's spend key, and recorded where the gateway looks
    spend = load_spend_key(home.spend_key_file()).public_key().public_bytes_raw()
    assert e["spend_key"] == spend.hex()
    record = json.loads(home.escrow_record().read_text())
    assert Address(record["escrow"]) == Address(e["escrow"]) and record["spend_key"] == spend.hex()
    e = imago(capsys, "escrow", "deposit", "1", *chain)
    assert float(e["available"]) > 5.88
    e = imago(capsys, "escrow", "close", *chain)
    assert e["state"] == "closing"
    time.sleep(4)
    e = imago(capsys, "escrow", "withdraw", *chain)
    assert e["state"] == "closed" and float(e["returned"]) > 5.85

    v = imago(capsys, "vault", "status", *chain)
    assert float(v["stake"]) > 19.9
    imago(capsys, "provider", "unstake", *chain)
    assert main(["provider", "withdraw", *chain]) == 1  # still unbonding
    # `allow-image dev` names the dev evidence's image, and never on a real network
    image = imago(capsys, "registry", "allow-image", "dev", *chain)
    assert image["image"] == f"{image_hash(DEV_MEASUREMENT):064x}" and image["allowed"]
    assert main(["registry", "allow-image", "dev", "--chain", "mainnet"]) == 1
    v = imago(capsys, "vault", "unstake", "5", *chain)
    assert v["unstaking"] == "5" and v["unlock_time"] > 0
    assert main(["vault", "withdraw-stake", *chain]) == 1  # still unbonding
