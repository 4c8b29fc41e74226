"""protocol.home: one state directory, one layout."""

from __future__ import annotations

from pathlib import Path

import pytest

from protocol import home


def test_imago_home_default_and_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("IMAGO_HOME", raising=False)
    assert home.imago_home() == Path.home() / ".imago"
    monkeypatch.setenv("IMAGO_HOME", "")
    assert home.imago_home() == Path.home() / ".imago"
    monkeypatch.setenv("IMAGO_HOME", "~/elsewhere")
    assert home.imago_home() == Path.home() / "elsewhere"
    monkeypatch.setenv("IMAGO_HOME", str(tmp_path))
    assert home.wallet_file("default") == tmp_path / "wallets" / "default.json"
    assert home.key_file("operator") == tmp_path / "keys" / "operator.json"
    assert home.deployment_file() == tmp_path / "deployment.json"
    assert home.stack_file() == tmp_path / "stack.json"
    assert home.devnet_dir() == tmp_path / "devnet"
    assert home.logs_dir() == tmp_path / "logs"
    assert home.matcher_dir() == tmp_path / "matcher"
    assert home.node_keystore() == tmp_path / "node" / "node_keys.json"
    assert home.spend_key_file() == tmp_path / "client" / "spend.key"
    assert home.escrow_record() == tmp_path / "client" / "escrow.json"
    # a service's --state-dir moves its files, and an explicit home wins over the env
    assert home.node_keystore(tmp_path / "n2") == tmp_path / "n2" / "node_keys.json"
    assert home.wallet_file("w", tmp_path / "h") == tmp_path / "h" / "wallets" / "w.json"


def test_nothing_else_spells_the_state_directory() -> None:
    """`IMAGO_HOME` and `.imago` appear in code only in protocol/home.py."""
    root = Path(__file__).resolve().parents[2]
    offenders = []
    for package in ("protocol", "contracts", "marketplace", "node", "client", "imago"):
        for path in (root / package).rglob("*.py"):
            if path.name == "home.py" and path.parent.name == "protocol":
                continue
            if "node_modules" in path.parts:
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                code = line.split("#", 1)[0]
                if 'environ.get("IMAGO_HOME"' in code or '".imago"' in code:
                    offenders.append(f"{path.relative_to(root)}:{n}")
    assert not offenders
