"""One async adapter for the toncenter v2 HTTP API.

It speaks to the local devnet, to toncenter (testnet and mainnet, with an API key
and rate limiting) and to a self-hosted ton-http-api alike. Results are typed
dataclasses; transactions expose what the BOC says (gas, fees, exit codes,
bounces) by parsing it with pytoniq_core.

    async with ToncenterClient("http://127.0.0.1:8600") as chain:
        info = await chain.get_address_information(addr)
        tx = await chain.wait_for_transaction(addr, after_lt=info.last_transaction_lt)
        trace = await chain.wait_for_trace(tx)
        gas = trace.total_gas_used

What it answers is typed in :mod:`contracts.chain.results` (accounts, get-methods and
their stack codec, the error) and :mod:`contracts.chain.transactions` (messages,
transactions, traces); the waits come from :mod:`contracts.chain.waiting`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import random
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from pytoniq_core import Address, Cell

from .results import (
    AddressInfo,
    FeeEstimate,
    GetMethodResult,
    MasterchainInfo,
    SentMessage,
    ToncenterError,
    WalletInfo,
    _addr,
    _b64,
    _decode_cell_value,
    decode_stack,
    encode_stack,
)
from .transactions import Transaction, external_message_hash_norm
from .waiting import TransactionWaiting

__all__ = [
    "DEVNET_URL",
    "MAINNET_URL",
    "TESTNET_URL",
    "ToncenterClient",
    "ToncenterError",
    "chain_url",
]

DEVNET_URL = "http://127.0.0.1:8600"
TESTNET_URL = "https://testnet.toncenter.com/api/v2"
MAINNET_URL = "https://toncenter.com/api/v2"
ZERO_HASH = bytes(32)


def chain_url(chain: str) -> str:
    """Map ``devnet|testnet|mainnet|URL`` to an API base URL."""
    named = {"devnet": DEVNET_URL, "testnet": TESTNET_URL, "mainnet": MAINNET_URL}
    if chain in named:
        return named[chain]
    if chain.startswith(("http://", "https://")):
        return chain.rstrip("/")
    raise ValueError(f"unknown chain {chain!r}: use devnet, testnet, mainnet or an http(s) URL")


# ----------------------------------------------------------------- the client


class _RateLimiter:
    def __init__(self, rps: float | None):
        self.interval = 0.0 if not rps else 1.0 / rps
        self._next = 0.0
        self._lock = asyncio.Lock()

    async def wait(self) -> None:
        if self.interval == 0.0:
            return
        async with self._lock:
            now = time.monotonic()
            delay = self._next - now
            if delay > 0:
                await asyncio.sleep(delay)
                now = time.monotonic()
            self._next = now + self.interval


def _default_rps(base_url: str, api_key: str | None) -> float | None:
    host = urlsplit(base_url).hostname or ""
    if host.endswith("toncenter.com"):
        return 10.0 if api_key else 0.9  # keyless toncenter allows 1 request/s
    return None


class ToncenterClient(TransactionWaiting):
    """toncenter v2 over aiohttp.

    :param base_url: API root that method names are appended to, e.g.
        ``http://127.0.0.1:8600`` (devnet), ``https://testnet.toncenter.com/api/v2``.
    :param api_key: sent as ``X-API-Key``.
    :param rps: client-side request rate cap; default 1 rps for keyless toncenter,
        10 with a key, unlimited elsewhere.
    :param max_retries: retries on 429, 502-504 and connection errors (exponential
        backoff with jitter, honouring Retry-After).
    """

    def __init__(
        self,
        base_url: str = DEVNET_URL,
        api_key: str | None = None,
        *,
        rps: float | None = -1.0,
        timeout: float = 30.0,
        max_retries: int = 6,
        session: aiohttp.ClientSession | None = None,
        testnet: bool | None = None,
    ):
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.max_retries = max_retries
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self._limiter = _RateLimiter(_default_rps(self.base_url, api_key) if rps == -1.0 else rps)
        self._session = session
        self._own_session = session is None
        host = urlsplit(self.base_url).hostname or ""
        self.testnet = testnet if testnet is not None else host != "toncenter.com"

    async def __aenter__(self) -> ToncenterClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()
        self._session = None

    def _sess(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            headers = {"Accept": "application/json"}
            if self.api_key:
                headers["X-API-Key"] = self.api_key
            self._session = aiohttp.ClientSession(
                headers=headers,
                timeout=self.timeout,
                connector=aiohttp.TCPConnector(limit=64, keepalive_timeout=20),
            )
            self._own_session = True
        return self._session

    async def call(
        self, method: str, params: dict[str, Any] | None = None, *, post: bool = False
    ) -> Any:
        """Call one API method and return its ``result``; raise ToncenterError otherwise."""
        url = f"{self.base_url}/{method}"
        # GET drops unset parameters; POST keeps them (JSON null means something)
        clean = (
            dict(params or {})
            if post
            else {k: v for k, v in (params or {}).items() if v is not None}
        )
        attempt = 0
        while True:
            await self._limiter.wait()
            try:
                if post:
                    req = self._sess().post(url, json=clean)
                else:
                    query = {k: _query_value(v) for k, v in clean.items()}
                    req = self._sess().get(url, params=query)
                async with req as resp:
                    status = resp.status
                    text = await resp.text()
                    retry_after = resp.headers.get("Retry-After")
            except (TimeoutError, aiohttp.ClientConnectionError) as e:
                if attempt >= self.max_retries:
                    raise ToncenterError(0, f"{type(e).__name__}: {e} ({url})") from e
                attempt += 1
                await asyncio.sleep(_backoff(attempt, None))
                continue
            if status in (429, 502, 503, 504) and attempt < self.max_retries:
                attempt += 1
                await asyncio.sleep(_backoff(attempt, retry_after))
                continue
            return _result(status, text, url)

    # -- accounts

    async def get_address_information(self, address: Address | str) -> AddressInfo:
        addr = _addr(address)
        r = await self.call("getAddressInformation", {"address": _raw(addr)})
        lt_id = r.get("last_transaction_id") or {}
        return AddressInfo(
            address=addr,
            balance=int(r.get("balance") or 0),
            state=_state_name(r.get("state")),
            code=Cell.one_from_boc(_b64(r["code"])) if r.get("code") else None,
            data=Cell.one_from_boc(_b64(r["data"])) if r.get("data") else None,
            last_transaction_lt=int(lt_id.get("lt") or 0),
            last_transaction_hash=_b64(lt_id["hash"]) if lt_id.get("hash") else ZERO_HASH,
            sync_utime=int(r.get("sync_utime") or 0),
            frozen_hash=_b64(r["frozen_hash"]) if r.get("frozen_hash") else None,
        )

    async def get_wallet_information(self, address: Address | str) -> WalletInfo:
        addr = _addr(address)
        r = await self.call("getWalletInformation", {"address": _raw(addr)})
        lt_id = r.get("last_transaction_id") or {}
        return WalletInfo(
            address=addr,
            is_wallet=bool(r.get("wallet")),
            balance=int(r.get("balance") or 0),
            state=_state_name(r.get("account_state")),
            seqno=int(r["seqno"]) if r.get("seqno") is not None else None,
            wallet_id=int(r["wallet_id"]) if r.get("wallet_id") is not None else None,
            wallet_type=r.get("wallet_type"),
            last_transaction_lt=int(lt_id.get("lt") or 0),
            last_transaction_hash=_b64(lt_id["hash"]) if lt_id.get("hash") else ZERO_HASH,
        )

    async def get_balance(self, address: Address | str) -> int:
        return int(await self.call("getAddressBalance", {"address": _raw(_addr(address))}))

    async def run_get_method(
        self, address: Address | str, method: str | int, stack: Sequence[Any] = ()
    ) -> GetMethodResult:
        """Run a get-method; a non-zero exit code is returned, not raised."""
        r = await self.call(
            "runGetMethod",
            {"address": _raw(_addr(address)), "method": method, "stack": encode_stack(stack)},
            post=True,
        )
        return GetMethodResult(
            exit_code=int(r.get("exit_code", 0)),
            gas_used=int(r.get("gas_used", 0)),
            stack=decode_stack(r.get("stack") or []),
        )

    # -- messages

    async def send_boc(self, boc: bytes | Cell) -> None:
        await self.call("sendBoc", {"boc": _boc_b64(boc)}, post=True)

    async def send_boc_return_hash(self, boc: bytes | Cell) -> SentMessage:
        """Send an external message; returns its hash and normalized hash."""
        b = boc.to_boc() if isinstance(boc, Cell) else boc
        r = await self.call("sendBocReturnHash", {"boc": _boc_b64(b)}, post=True)
        norm = r.get("hash_norm")
        return SentMessage(
            hash=_b64(r["hash"]),
            hash_norm=_b64(norm) if norm else external_message_hash_norm(b),
        )

    async def estimate_fee(
        self,
        address: Address | str,
        body: Cell,
        *,
        init_code: Cell | None = None,
        init_data: Cell | None = None,
        ignore_chksig: bool = True,
    ) -> FeeEstimate:
        r = await self.call(
            "estimateFee",
            {
                "address": _raw(_addr(address)),
                "body": _boc_b64(body),
                "init_code": _boc_b64(init_code) if init_code else "",
                "init_data": _boc_b64(init_data) if init_data else "",
                "ignore_chksig": ignore_chksig,
            },
            post=True,
        )
        f = r["source_fees"]
        return FeeEstimate(
            in_fwd_fee=int(f["in_fwd_fee"]),
            storage_fee=int(f["storage_fee"]),
            gas_fee=int(f["gas_fee"]),
            fwd_fee=int(f["fwd_fee"]),
        )

    # -- history

    async def get_transactions(
        self,
        address: Address | str,
        *,
        limit: int = 10,
        lt: int | None = None,
        hash: bytes | None = None,
        to_lt: int | None = None,
        archival: bool = False,
    ) -> list[Transaction]:
        """Newest first; ``lt``+``hash`` start at that transaction, ``to_lt`` (exclusive) stops."""
        addr = _addr(address)
        params: dict[str, Any] = {"address": _raw(addr), "limit": limit}
        if lt is not None:
            params["lt"] = lt
        if hash is not None:
            params["hash"] = base64.b64encode(hash).decode()
        if to_lt:
            params["to_lt"] = to_lt
        if archival:
            params["archival"] = "true"
        rows = await self.call("getTransactions", params)
        return [Transaction.from_json(row) for row in rows]

    async def get_masterchain_info(self) -> MasterchainInfo:
        r = await self.call("getMasterchainInfo")
        last = r["last"]
        return MasterchainInfo(
            seqno=int(last["seqno"]),
            workchain=int(last["workchain"]),
            shard=str(last["shard"]),
            root_hash=last.get("root_hash", ""),
            file_hash=last.get("file_hash", ""),
        )

    # -- config

    async def get_config_param(self, param: int) -> Cell:
        """The cell of one blockchain config param (``getConfigParam``)."""
        r = await self.call("getConfigParam", {"config_id": param})
        return _decode_cell_value(r["config"])

    async def get_global_id(self) -> int:
        """The network's global id (config param 19): mainnet -239, testnet -3, the Imago
        devnet its own (``protocol.signed.DEVNET_GLOBAL_ID``). Every signed object names
        it, and the contracts refuse one signed for another network."""
        return (await self.get_config_param(19)).begin_parse().load_int(32)


def _query_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def _backoff(attempt: int, retry_after: str | None) -> float:
    if retry_after:
        with contextlib.suppress(ValueError):
            return min(float(retry_after), 30.0)
    return min(0.25 * (2 ** (attempt - 1)), 8.0) * (0.8 + 0.4 * random.random())


def _result(status: int, text: str, url: str) -> Any:
    import json

    try:
        body = json.loads(text)
    except ValueError:
        raise ToncenterError(
            status or 0, f"non-JSON answer from {url}: {text[:200]}", status=status
        ) from None
    if isinstance(body, dict) and body.get("ok") is True and status < 400:
        return body.get("result")
    if isinstance(body, dict):
        code = int(body.get("code") or status)
        message = str(body.get("error") or body.get("result") or text[:200])
        exit_code = body.get("exit_code")
        raise ToncenterError(code, message, status=status, exit_code=exit_code)
    raise ToncenterError(status, f"unexpected answer from {url}: {text[:200]}", status=status)


def _raw(addr: Address) -> str:
    return addr.to_str(is_user_friendly=False)


def _boc_b64(boc: bytes | Cell) -> str:
    if isinstance(boc, Cell):
        boc = boc.to_boc()
    return base64.b64encode(boc).decode()


def _state_name(s: str | None) -> str:
    if s in ("active", "frozen"):
        return s
    return "uninitialized"
