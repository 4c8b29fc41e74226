"""The devnet keeps accounts and history across a restart."""

from __future__ import annotations

import json
import os

from pytoniq_core import Address

from contracts.chain.devnet import DevnetProcess
from contracts.chain.wallet import Wallet, WalletKeys
from tests.chain.fixtures import TON, about


async def test_restart_keeps_accounts_and_history(tmp_path) -> None:
    state_dir = tmp_path / "dn"
    keys = WalletKeys.generate(mnemonic=False)
    dest = Address((0, os.urandom(32)))
    with DevnetProcess(state_dir, port=0) as proc:
        assert proc.startup_seconds is not None  # ~0.8 s on an idle 2-core machine
        async with proc.client() as chain:
            w = Wallet(chain, keys)
            await chain.faucet(w.address, 10 * TON)
            await w.deploy()
            await w.transfer(dest, 2 * TON, "before restart", bounce=False)
            balance = await w.balance()
            history = [(t.lt, t.hash) for t in await chain.get_transactions(w.address, limit=20)]
            dest_history = [(t.lt, t.hash) for t in await chain.get_transactions(dest)]
            seqno_info = await chain.get_masterchain_info()
        first_port = proc.port
    # SIGTERM saved the state atomically (no temp file left behind)
    assert (state_dir / "state.json").exists()
    assert not [p for p in state_dir.iterdir() if ".tmp-" in p.name]
    json.loads((state_dir / "state.json").read_text())

    with DevnetProcess(state_dir, port=0) as proc:
        assert proc.port > 0 and first_port > 0
        async with proc.client() as chain:
            w = Wallet(chain, keys)
            assert await w.balance() == balance
            assert await w.seqno() == 2
            assert about(await chain.get_balance(dest), 2 * TON)
            assert [(t.lt, t.hash) for t in await chain.get_transactions(w.address, limit=20)] == (
                history
            )
            assert [(t.lt, t.hash) for t in await chain.get_transactions(dest)] == dest_history
            assert (await chain.get_masterchain_info()).seqno >= seqno_info.seqno
            # the chain goes on: lt keeps growing, the wallet keeps working
            trace = await w.transfer(dest, TON, "after restart", bounce=False)
            assert trace.root.success and trace.root.lt > history[0][0]
            assert 3 * TON - 1000 < await chain.get_balance(dest) <= 3 * TON  # storage fee


async def test_state_is_saved_while_running_and_history_is_bounded(tmp_path) -> None:
    state_dir = tmp_path / "dn"
    dest = Address((0, os.urandom(32)))
    with DevnetProcess(state_dir, port=0, history_limit=5) as proc:
        async with proc.client() as chain:
            for _ in range(8):
                await chain.faucet(dest, TON)
            assert len(await chain.get_transactions(dest, limit=100)) == 5
            await chain.flush()
            saved = json.loads((state_dir / "state.json").read_text())
            raw = dest.to_str(is_user_friendly=False)
            assert len(saved["history"][raw]) == 5
            assert raw in saved["accounts"]
            # a crash (SIGKILL) after a flush loses nothing that was flushed
            proc._proc.kill()
            proc._proc.wait()
    with DevnetProcess(state_dir, port=0, history_limit=5) as proc:
        async with proc.client() as chain:
            assert about(await chain.get_balance(dest), 8 * TON)
            assert len(await chain.get_transactions(dest, limit=100)) == 5
