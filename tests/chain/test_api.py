"""The devnet's toncenter v2 API: shapes, behaviour and malformed input."""

from __future__ import annotations

import asyncio
import base64
import os
import time

import aiohttp
import pytest
from pytoniq_core import Address, Builder, Cell

from contracts.chain.devnet import DevnetProcess
from contracts.chain.results import ToncenterError, decode_stack, encode_stack
from contracts.chain.transactions import external_message_hash_norm
from contracts.chain.wallet import OutMessage, Wallet, WalletKeys
from tests.chain.fixtures import TON, DevnetFixture, about


async def raw(
    devnet: DevnetFixture, method: str, params: dict | None = None, *, post: bool = False
) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as s:
        url = f"{devnet.url}/{method}"
        req = s.post(url, json=params or {}) if post else s.get(url, params=params or {})
        async with req as resp:
            return resp.status, await resp.json(content_type=None)


def fresh_address() -> Address:
    return Address((0, os.urandom(32)))


def raw_addr(a: Address) -> str:
    return a.to_str(is_user_friendly=False)


# ----------------------------------------------------------------- happy paths and shapes


async def test_masterchain_info_shape_and_seqno_advances(devnet: DevnetFixture) -> None:
    status, body = await raw(devnet, "getMasterchainInfo")
    assert status == 200 and body["ok"] is True
    last = body["result"]["last"]
    assert body["result"]["@type"] == "blocks.masterchainInfo"
    assert last["@type"] == "ton.blockIdExt" and last["workchain"] == -1
    assert {"shard", "seqno", "root_hash", "file_hash"} <= last.keys()
    before = (await devnet.chain.get_masterchain_info()).seqno
    await devnet.chain.faucet(fresh_address(), TON)
    assert (await devnet.chain.get_masterchain_info()).seqno > before


async def test_config_params_and_the_devnets_own_global_id(devnet: DevnetFixture) -> None:
    """The devnet serves getConfigParam; its global id is its own, not mainnet's."""
    from protocol.signed import DEVNET_GLOBAL_ID, MAINNET_GLOBAL_ID

    status, body = await raw(devnet, "getConfigParam", {"config_id": 19})
    assert status == 200 and body["result"]["@type"] == "configInfo"
    assert await devnet.chain.get_global_id() == DEVNET_GLOBAL_ID != MAINNET_GLOBAL_ID
    prices = (await devnet.chain.get_config_param(18)).begin_parse()
    assert prices.remaining_bits > 0 or prices.remaining_refs > 0  # storage prices: mainnet's
    status, body = await raw(devnet, "getConfigParam", {"config_id": 12345})
    assert status == 404 and body["ok"] is False
    cells, bits = await devnet.chain.storage_stat(fresh_address())
    assert (cells, bits) == (0, 0)  # no account


async def test_address_information_unknown_and_funded(devnet: DevnetFixture) -> None:
    a = fresh_address()
    status, body = await raw(devnet, "getAddressInformation", {"address": raw_addr(a)})
    assert status == 200 and body["ok"] is True
    r = body["result"]
    assert r["@type"] == "raw.fullAccountState"
    assert r["balance"] == "0" and r["state"] == "uninitialized"
    assert r["code"] == "" and r["data"] == ""
    assert r["last_transaction_id"]["lt"] == "0"
    assert {"block_id", "sync_utime", "frozen_hash", "extra_currencies"} <= r.keys()

    fr = await devnet.chain.faucet(a, 3 * TON)
    # POST JSON is accepted as well as GET query parameters; friendly addresses too
    friendly = a.to_str(is_bounceable=False, is_test_only=True)
    status, body = await raw(devnet, "getAddressInformation", {"address": friendly}, post=True)
    assert status == 200
    assert body["result"]["balance"] == str(3 * TON)
    assert body["result"]["last_transaction_id"]["lt"] == str(fr.lt)
    assert base64.b64decode(body["result"]["last_transaction_id"]["hash"]) == fr.hash
    assert await devnet.chain.get_balance(a) == 3 * TON
    status, body = await raw(devnet, "getAddressBalance", {"address": raw_addr(a)})
    assert body == {"ok": True, "result": str(3 * TON)}


async def test_wallet_deploy_transfer_gas_and_wallet_information(
    devnet: DevnetFixture, make_wallet
) -> None:
    w = await make_wallet(10 * TON, deploy=False)
    trace = await w.deploy()
    assert trace is not None and len(trace) == 1
    assert trace.root.gas_used == 4222  # wallet v5r1 deploy, as measured on mainnet's TVM
    assert trace.root.success

    dest = fresh_address()
    trace = await w.transfer(dest, TON, bounce=False)
    assert len(trace) == 2
    assert trace.root.gas_used == 4939  # wallet v5r1 transfer
    assert trace.root.exit_code == 0 and trace.root.fee > 0
    assert trace.transactions[1].in_msg.value == TON
    assert about(await devnet.chain.get_balance(dest), TON)

    info = await devnet.chain.get_wallet_information(w.address)
    assert info.is_wallet and info.seqno == 2 and info.wallet_type == "wallet v5 r1"
    assert info.wallet_id == w.wallet_id
    status, body = await raw(devnet, "getWalletInformation", {"address": raw_addr(w.address)})
    assert body["result"]["wallet"] is True
    assert {"balance", "account_state", "seqno", "wallet_id", "last_transaction_id"} <= body[
        "result"
    ].keys()
    status, body = await raw(devnet, "getWalletInformation", {"address": raw_addr(dest)})
    assert body["result"]["wallet"] is False


async def test_transactions_shape_and_paging(devnet: DevnetFixture, make_wallet) -> None:
    w = await make_wallet(10 * TON)
    dest = fresh_address()
    for i in range(3):
        await w.transfer(dest, TON // 10, f"n{i}", bounce=False)
    status, body = await raw(devnet, "getTransactions", {"address": raw_addr(w.address)})
    assert status == 200
    txs = body["result"]
    assert len(txs) == 5  # faucet credit, deploy, 3 transfers
    t = txs[0]
    assert t["@type"] == "raw.transaction"
    for key in ("utime", "data", "transaction_id", "fee", "storage_fee", "other_fee"):
        assert key in t
    assert int(t["fee"]) == int(t["storage_fee"]) + int(t["other_fee"])
    assert t["in_msg"]["source"] == "" and t["in_msg"]["value"] == "0"  # external in
    out = t["out_msgs"][0]
    assert Address(out["destination"]) == dest and out["value"] == str(TON // 10)
    assert out["message"] == "n2" and out["msg_data"]["@type"] == "msg.dataRaw"
    # newest first, strictly decreasing lt
    lts = [int(x["transaction_id"]["lt"]) for x in txs]
    assert lts == sorted(lts, reverse=True) and len(set(lts)) == len(lts)

    # paging: limit, then lt+hash (inclusive) and to_lt (exclusive)
    page1 = await devnet.chain.get_transactions(w.address, limit=2)
    assert [x.lt for x in page1] == lts[:2]
    page2 = await devnet.chain.get_transactions(
        w.address, limit=2, lt=page1[-1].lt, hash=page1[-1].hash
    )
    assert [x.lt for x in page2] == lts[1:3]
    tail = await devnet.chain.get_transactions(w.address, limit=10, to_lt=lts[2])
    assert [x.lt for x in tail] == lts[:2]
    # the BOC parses and agrees with the JSON
    parsed = page1[0]
    assert parsed.parsed.lt == parsed.lt
    assert parsed.total_fees == parsed.fee


async def test_run_get_method_stack_encoding(devnet: DevnetFixture, make_wallet) -> None:
    w = await make_wallet(5 * TON)
    status, body = await raw(
        devnet,
        "runGetMethod",
        {"address": raw_addr(w.address), "method": "seqno", "stack": []},
        post=True,
    )
    assert status == 200
    r = body["result"]
    assert r["@type"] == "smc.runResult" and r["exit_code"] == 0 and r["gas_used"] > 0
    assert r["stack"] == [["num", "0x1"]]

    # values pass through the stack both ways (extra arguments stay below the result)
    cell = Builder().store_uint(0xDEADBEEF, 32).end_cell()
    res = await devnet.chain.run_get_method(w.address, "seqno", [-5, 2**200, cell, w.address])
    assert res.exit_code == 0
    assert res.stack[-1] == 1
    assert -5 in res.stack and 2**200 in res.stack
    cells = [v for v in res.stack if isinstance(v, Cell)]
    assert any(c.hash == cell.hash for c in cells)
    # get_public_key returns the key as an int
    res = await devnet.chain.run_get_method(w.address, "get_public_key")
    assert res.int(0) == int.from_bytes(w.keys.public_key, "big")
    # an unknown method is an exit code, not an HTTP error (as on toncenter)
    res = await devnet.chain.run_get_method(w.address, "no_such_method")
    assert res.exit_code == 11 and not res.ok
    # an account without code
    res = await devnet.chain.run_get_method(fresh_address(), "seqno")
    assert res.exit_code == -13


def test_stack_codec_roundtrip() -> None:
    cell = Builder().store_uint(7, 8).end_cell()
    enc = encode_stack([1, -1, 0, cell])
    assert enc[0] == ["num", "0x1"] and enc[1] == ["num", "-0x1"]
    dec = decode_stack(
        [
            ["num", "0x10"],
            ["num", "-0x10"],
            ["cell", {"bytes": base64.b64encode(cell.to_boc()).decode()}],
            [
                "tuple",
                {
                    "@type": "tvm.tuple",
                    "elements": [
                        {
                            "@type": "tvm.stackEntryNumber",
                            "number": {"@type": "tvm.numberDecimal", "number": "42"},
                        }
                    ],
                },
            ],
            ["null", None],
        ]
    )
    assert dec[0] == 16 and dec[1] == -16 and dec[2].hash == cell.hash
    assert dec[3] == [42] and dec[4] is None


async def test_send_boc_return_hash_and_send_boc(devnet: DevnetFixture, make_wallet) -> None:
    w = await make_wallet(5 * TON)
    dest = fresh_address()
    boc = w.build_external([OutMessage(dest, TON, bounce=False)], seqno=await w.seqno())
    status, body = await raw(
        devnet, "sendBocReturnHash", {"boc": base64.b64encode(boc).decode()}, post=True
    )
    assert status == 200
    r = body["result"]
    assert r["@type"] == "raw.extMessageInfo"
    assert base64.b64decode(r["hash"]) == Cell.one_from_boc(boc).hash
    assert base64.b64decode(r["hash_norm"]) == external_message_hash_norm(boc)
    assert about(await devnet.chain.get_balance(dest), TON)

    boc = w.build_external([OutMessage(dest, TON, bounce=False)], seqno=await w.seqno())
    status, body = await raw(devnet, "sendBoc", {"boc": base64.b64encode(boc).decode()}, post=True)
    assert status == 200 and body["ok"] is True and body["result"]["@type"] == "ok"
    assert about(await devnet.chain.get_balance(dest), 2 * TON)

    # a replay (same seqno) is rejected by the wallet, as toncenter reports it
    with pytest.raises(ToncenterError) as err:
        await devnet.chain.send_boc(boc)
    assert "not accepted" in err.value.message


async def test_estimate_fee(devnet: DevnetFixture, make_wallet) -> None:
    w = await make_wallet(5 * TON)
    seqno = await w.seqno()
    body = w._signer.raw_create_transfer_msg(
        private_key=w.keys.private_key,
        seqno=seqno,
        wallet_id=w.wallet_id,
        messages=[OutMessage(fresh_address(), TON, bounce=False).to_wallet_message()],
        valid_until=int(time.time()) + 60,
    )
    fee = await devnet.chain.estimate_fee(w.address, body)
    assert fee.gas_fee > 0 and fee.in_fwd_fee > 0 and fee.fwd_fee > 0
    status, resp = await raw(
        devnet,
        "estimateFee",
        {"address": raw_addr(w.address), "body": base64.b64encode(body.to_boc()).decode()},
        post=True,
    )
    assert resp["result"]["@type"] == "query.fees"
    assert {"in_fwd_fee", "storage_fee", "gas_fee", "fwd_fee"} <= resp["result"][
        "source_fees"
    ].keys()
    # estimating changed nothing
    assert await w.seqno() == seqno


async def test_bounce_is_traced(devnet: DevnetFixture, make_wallet) -> None:
    w = await make_wallet(5 * TON)
    before = await w.balance()
    trace = await w.transfer(fresh_address(), TON, bounce=True)
    assert len(trace) == 3  # wallet -> uninitialized account (bounces) -> wallet
    dest_tx, back_tx = trace.transactions[1], trace.transactions[2]
    assert dest_tx.aborted and dest_tx.bounced_out
    assert back_tx.bounced_in and back_tx.in_msg.value > 0
    assert before - await w.balance() < TON // 10  # only fees were lost


async def test_faucet_and_clock(tmp_path) -> None:
    # its own devnet: moving the clock forward is for good (chain time is monotonic)
    with DevnetProcess(tmp_path / "dn", port=0) as proc:
        async with proc.client() as chain:
            now, pinned = await chain.clock()
            assert not pinned and abs(now - time.time()) < 5
            w = Wallet(chain, WalletKeys.generate(mnemonic=False))
            fr = await chain.faucet(w.address, 5 * TON)
            assert fr.amount == 5 * TON and fr.transactions == 2  # treasury + receiver
            tx = (await chain.get_transactions(w.address, limit=1))[0]
            assert tx.lt == fr.lt and tx.hash == fr.hash and abs(tx.utime - time.time()) < 5

            target = int(time.time()) + 3600
            assert await chain.set_clock(target) == target
            assert (await chain.clock()) == (target, True)
            await w.deploy()  # wallets sign with chain time when it is ahead
            tx = (await chain.get_transactions(w.address, limit=1))[0]
            assert tx.utime == target
            res = await chain.run_get_method(w.address, "seqno")
            assert res.int(0) == 1

            # a pin before the last transaction is clamped: time never goes backwards
            assert await chain.set_clock(target - 100) == target
            # unpinned: wall time again, but not before the last block
            assert await chain.set_clock(None) == target
            now, pinned = await chain.clock()
            assert not pinned and now == target
            trace = await w.transfer(Address((0, os.urandom(32))), TON, bounce=False)
            assert trace.root.success and trace.root.utime == target


async def test_wait_for_transaction_timeout_and_success(devnet: DevnetFixture) -> None:
    a = fresh_address()
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        await devnet.chain.wait_for_transaction(a, timeout=0.4)
    assert time.monotonic() - t0 < 3

    async def later() -> None:
        await asyncio.sleep(0.3)
        await devnet.chain.faucet(a, TON)

    task = asyncio.create_task(later())
    tx = await devnet.chain.wait_for_transaction(a, timeout=10, interval=0.05)
    await task
    assert tx.in_msg is not None and tx.in_msg.value == TON


# ----------------------------------------------------------------- malformed input


async def assert_alive(devnet: DevnetFixture) -> None:
    status, body = await raw(devnet, "devnet/health")
    assert status == 200 and body["result"]["status"] == "ok"


@pytest.mark.parametrize(
    ("method", "params", "post", "status"),
    [
        ("getAddressInformation", {"address": "not-an-address"}, False, 416),
        ("getAddressInformation", {}, False, 416),
        ("getTransactions", {"address": "0:1234"}, False, 416),
        ("getTransactions", {"address": "0:" + "00" * 32, "limit": "x"}, False, 416),
        ("sendBoc", {"boc": "!!!notbase64"}, True, 400),
        ("sendBoc", {"boc": base64.b64encode(b"garbage bytes").decode()}, True, 400),
        ("sendBoc", {}, True, 400),
        ("sendBocReturnHash", {"boc": 12}, True, 400),
        (
            "runGetMethod",
            {"address": "0:" + "00" * 32, "method": "seqno", "stack": [["weird", 1]]},
            True,
            400,
        ),
        (
            "runGetMethod",
            {"address": "0:" + "00" * 32, "method": "seqno", "stack": [["num", "zz"]]},
            True,
            400,
        ),
        ("runGetMethod", {"address": "0:" + "00" * 32}, True, 400),
        ("estimateFee", {"address": "0:" + "00" * 32, "body": "%%%"}, True, 400),
        ("noSuchMethod", {}, False, 404),
        ("devnet/nothing", {}, False, 404),
        ("devnet/faucet", {"address": "0:" + "00" * 32, "amount": "-5"}, True, 400),
        ("devnet/faucet", {"address": "0:" + "00" * 32, "amount": "lots"}, True, 400),
        ("devnet/clock", {"now": "yesterday"}, True, 400),
    ],
)
async def test_malformed_requests_get_toncenter_errors(
    devnet: DevnetFixture, method: str, params: dict, post: bool, status: int
) -> None:
    got, body = await raw(devnet, method, params, post=post)
    assert got == status
    assert body["ok"] is False and isinstance(body["error"], str) and body["code"] == status
    await assert_alive(devnet)


async def test_bad_json_and_raw_garbage(devnet: DevnetFixture) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.post(
            f"{devnet.url}/sendBoc", data=b"{not json", headers={"content-type": "application/json"}
        ) as resp:
            assert resp.status == 400
            body = await resp.json(content_type=None)
            assert body["ok"] is False and body["code"] == 400
        async with s.post(f"{devnet.url}/runGetMethod", data=b"[1,2]") as resp:
            assert resp.status == 400
    # not even HTTP
    host, port = devnet.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"\x16\x03\x01 this is not http\r\n\r\n")
    await writer.drain()
    await asyncio.wait_for(reader.read(1024), 5)
    writer.close()
    await assert_alive(devnet)
    # the adapter raises ToncenterError with the code
    with pytest.raises(ToncenterError) as err:
        await devnet.chain.call("getAddressInformation", {"address": "nonsense"})
    assert err.value.code == 416 and err.value.status == 416
    with pytest.raises(ToncenterError) as err:  # checked before sending, same error
        await devnet.chain.get_address_information("nonsense")
    assert err.value.code == 416


async def test_concurrent_clients(devnet: DevnetFixture, make_wallet) -> None:
    wallets = await asyncio.gather(*(make_wallet(2 * TON) for _ in range(6)))
    dest = fresh_address()
    traces = await asyncio.gather(*(w.transfer(dest, TON // 2, bounce=False) for w in wallets))
    assert all(t.root.success for t in traces)
    assert about(await devnet.chain.get_balance(dest), 3 * TON)


async def test_api_v2_prefix_and_json_rpc(devnet: DevnetFixture) -> None:
    a = raw_addr(fresh_address())
    status, body = await raw(devnet, "api/v2/getAddressBalance", {"address": a})
    assert status == 200 and body == {"ok": True, "result": "0"}
    status, body = await raw(
        devnet,
        "jsonRPC",
        {"id": 7, "jsonrpc": "2.0", "method": "getAddressBalance", "params": {"address": a}},
        post=True,
    )
    assert status == 200 and body["result"] == "0" and body["id"] == 7
    status, body = await raw(devnet, "jsonRPC", {"id": 1, "method": "nope"}, post=True)
    assert status == 404 and body["ok"] is False


async def test_wait_for_transaction_pages_past_fifty(devnet: DevnetFixture) -> None:
    a = fresh_address()
    first = await devnet.chain.faucet(a, TON)
    for i in range(60):
        await devnet.chain.faucet(a, TON + i + 1)
    # the oldest match after first.lt is 61 transactions back: beyond one page of 50
    tx = await devnet.chain.wait_for_transaction(
        a, after_lt=first.lt, predicate=lambda t: t.in_msg.value == TON + 1, timeout=5
    )
    assert tx.in_msg.value == TON + 1
    newest = await devnet.chain.wait_for_transaction(a, timeout=5)
    assert newest.lt > first.lt
