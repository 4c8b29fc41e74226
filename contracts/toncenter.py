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
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from pytoniq_core import Address, Builder, Cell, Slice
from pytoniq_core.tlb.transaction import MessageAny
from pytoniq_core.tlb.transaction import Transaction as TlbTransaction

__all__ = [
    "DEVNET_URL",
    "MAINNET_URL",
    "TESTNET_URL",
    "AddressInfo",
    "FeeEstimate",
    "GetMethodResult",
    "MasterchainInfo",
    "Message",
    "SentMessage",
    "ToncenterClient",
    "ToncenterError",
    "Trace",
    "Transaction",
    "WalletInfo",
    "chain_url",
    "decode_stack",
    "encode_stack",
    "external_message_hash_norm",
]

DEVNET_URL = "http://127.0.0.1:8600"
TESTNET_URL = "https://testnet.toncenter.com/api/v2"
MAINNET_URL = "https://toncenter.com/api/v2"
ZERO_HASH = bytes(32)


class ToncenterError(Exception):
    """An error answered by the API (``{"ok": false, "error", "code"}``) or the transport.

    ``code`` is toncenter's code (the HTTP status for most errors); ``status`` is the
    HTTP status (0 for transport failures); ``exit_code`` is set when the error
    reports a TVM exit code.
    """

    def __init__(self, code: int, message: str, *, status: int = 0, exit_code: int | None = None):
        super().__init__(f"toncenter error {code}: {message}")
        self.code = code
        self.message = message
        self.status = status
        self.exit_code = exit_code


def chain_url(chain: str) -> str:
    """Map ``devnet|testnet|mainnet|URL`` to an API base URL."""
    named = {"devnet": DEVNET_URL, "testnet": TESTNET_URL, "mainnet": MAINNET_URL}
    if chain in named:
        return named[chain]
    if chain.startswith(("http://", "https://")):
        return chain.rstrip("/")
    raise ValueError(f"unknown chain {chain!r}: use devnet, testnet, mainnet or an http(s) URL")


# ----------------------------------------------------------------- result types


def _addr_or_none(text: str | None) -> Address | None:
    if not text:
        return None
    return Address(text)


def _b64(data: str) -> bytes:
    return base64.b64decode(
        data + "=" * (-len(data) % 4), altchars=b"-_" if "-" in data or "_" in data else None
    )


@dataclass(frozen=True)
class AddressInfo:
    """getAddressInformation."""

    address: Address
    balance: int
    state: str  # "active" | "uninitialized" | "frozen"
    code: Cell | None
    data: Cell | None
    last_transaction_lt: int
    last_transaction_hash: bytes
    sync_utime: int
    frozen_hash: bytes | None = None

    @property
    def is_active(self) -> bool:
        return self.state == "active"


@dataclass(frozen=True)
class WalletInfo:
    """getWalletInformation."""

    address: Address
    is_wallet: bool
    balance: int
    state: str
    seqno: int | None
    wallet_id: int | None
    wallet_type: str | None
    last_transaction_lt: int
    last_transaction_hash: bytes


@dataclass(frozen=True)
class GetMethodResult:
    """runGetMethod: exit code, gas and the decoded stack (ints, Cells, lists, None)."""

    exit_code: int
    gas_used: int
    stack: list[Any]

    @property
    def ok(self) -> bool:
        return self.exit_code in (0, 1)

    def int(self, i: int) -> int:
        v = self.stack[i]
        if not isinstance(v, int):
            raise TypeError(f"stack[{i}] is {type(v).__name__}, not int")
        return v

    def cell(self, i: int) -> Cell:
        v = self.stack[i]
        if isinstance(v, Slice):
            return v.to_cell()
        if not isinstance(v, Cell):
            raise TypeError(f"stack[{i}] is {type(v).__name__}, not a cell")
        return v

    def slice(self, i: int) -> Slice:
        v = self.stack[i]
        return v if isinstance(v, Slice) else self.cell(i).begin_parse()

    def address(self, i: int) -> Address | None:
        """A MsgAddress returned as a slice (None for addr_none)."""
        return self.slice(i).load_address()


@dataclass(frozen=True)
class SentMessage:
    """sendBocReturnHash: the message hash and its normalized hash (base64 decoded)."""

    hash: bytes
    hash_norm: bytes


@dataclass(frozen=True)
class FeeEstimate:
    in_fwd_fee: int
    storage_fee: int
    gas_fee: int
    fwd_fee: int

    @property
    def total(self) -> int:
        return self.in_fwd_fee + self.storage_fee + self.gas_fee + self.fwd_fee


@dataclass(frozen=True)
class MasterchainInfo:
    seqno: int
    workchain: int
    shard: str
    root_hash: str
    file_hash: str


@dataclass
class Message:
    """A message as toncenter shows it (``raw.message``)."""

    hash: bytes
    source: str  # user-friendly, "" for external-in
    destination: str  # "" for external-out
    value: int
    fwd_fee: int
    ihr_fee: int
    created_lt: int
    body_b64: str
    init_state_b64: str
    comment: str
    bounce: bool | None = None
    bounced: bool | None = None

    @classmethod
    def from_json(cls, j: dict[str, Any]) -> Message:
        md = j.get("msg_data") or {}
        return cls(
            hash=_b64(j["hash"]) if j.get("hash") else b"",
            source=j.get("source") or "",
            destination=j.get("destination") or "",
            value=int(j.get("value") or 0),
            fwd_fee=int(j.get("fwd_fee") or 0),
            ihr_fee=int(j.get("ihr_fee") or 0),
            created_lt=int(j.get("created_lt") or 0),
            body_b64=md.get("body") or "",
            init_state_b64=md.get("init_state") or "",
            comment=j.get("message") or "",
            bounce=j.get("bounce"),
            bounced=j.get("bounced"),
        )

    @property
    def is_external_in(self) -> bool:
        return self.source == ""

    @cached_property
    def source_address(self) -> Address | None:
        return _addr_or_none(self.source)

    @cached_property
    def destination_address(self) -> Address | None:
        return _addr_or_none(self.destination)

    @cached_property
    def body(self) -> Cell:
        if not self.body_b64:
            return Cell.empty()
        return Cell.one_from_boc(_b64(self.body_b64))

    @property
    def op(self) -> int | None:
        """The 32-bit opcode at the start of the body, if any."""
        s = self.body.begin_parse()
        return s.load_uint(32) if s.remaining_bits >= 32 else None

    @property
    def query_id(self) -> int | None:
        s = self.body.begin_parse()
        if s.remaining_bits < 96:
            return None
        s.skip_bits(32)
        return s.load_uint(64)

    @cached_property
    def hash_norm(self) -> bytes | None:
        """Normalized hash of an external-in message (None for internal ones)."""
        if not self.is_external_in or not self.destination:
            return None
        return _norm_hash(Address(self.destination), self.body)


def _norm_hash(dest: Address, body: Cell) -> bytes:
    return (
        Builder()
        .store_uint(0b10, 2)
        .store_uint(0, 2)
        .store_address(dest)
        .store_coins(0)
        .store_bit(0)
        .store_bit(1)
        .store_ref(body)
        .end_cell()
        .hash
    )


def external_message_hash_norm(boc: bytes | Cell) -> bytes:
    """Normalized hash of a serialized external-in message (matches toncenter's hash_norm)."""
    cell = boc if isinstance(boc, Cell) else Cell.one_from_boc(boc)
    msg = MessageAny.deserialize(cell.begin_parse())
    return _norm_hash(msg.info.dest, msg.body)


@dataclass
class Transaction:
    """A transaction (``raw.transaction``); phase details are parsed from its BOC on demand."""

    account: str
    lt: int
    hash: bytes
    utime: int
    fee: int
    storage_fee: int
    other_fee: int
    in_msg: Message | None
    out_msgs: list[Message]
    data_b64: str

    @classmethod
    def from_json(cls, j: dict[str, Any], account: str = "") -> Transaction:
        tid = j["transaction_id"]
        addr = j.get("address")
        if isinstance(addr, dict):
            account = addr.get("account_address") or account
        return cls(
            account=account,
            lt=int(tid["lt"]),
            hash=_b64(tid["hash"]),
            utime=int(j.get("utime") or 0),
            fee=int(j.get("fee") or 0),
            storage_fee=int(j.get("storage_fee") or 0),
            other_fee=int(j.get("other_fee") or 0),
            in_msg=Message.from_json(j["in_msg"]) if j.get("in_msg") else None,
            out_msgs=[Message.from_json(m) for m in j.get("out_msgs") or []],
            data_b64=j.get("data") or "",
        )

    @cached_property
    def parsed(self) -> TlbTransaction:
        """The transaction parsed from its BOC (pytoniq_core TL-B)."""
        return TlbTransaction.deserialize(Slice.one_from_boc(_b64(self.data_b64)))

    @property
    def _compute(self) -> Any:
        return getattr(self.parsed.description, "compute_ph", None)

    @property
    def compute_skipped(self) -> bool:
        cp = self._compute
        return cp is None or cp.type_ == "skipped"

    @property
    def gas_used(self) -> int:
        """Gas used by the compute phase (0 if skipped)."""
        cp = self._compute
        return 0 if cp is None or cp.type_ == "skipped" else int(cp.gas_used)

    @property
    def gas_fees(self) -> int:
        cp = self._compute
        return 0 if cp is None or cp.type_ == "skipped" else int(cp.gas_fees)

    @property
    def exit_code(self) -> int | None:
        """Compute-phase exit code; None if the compute phase was skipped."""
        cp = self._compute
        return None if cp is None or cp.type_ == "skipped" else int(cp.exit_code)

    @property
    def compute_success(self) -> bool:
        cp = self._compute
        return cp is not None and cp.type_ != "skipped" and bool(cp.success)

    @property
    def action_result_code(self) -> int | None:
        action = getattr(self.parsed.description, "action", None)
        return None if action is None else int(action.result_code)

    @property
    def aborted(self) -> bool:
        return bool(getattr(self.parsed.description, "aborted", False))

    @property
    def success(self) -> bool:
        """Compute succeeded, actions (if any) succeeded, not aborted."""
        return self.compute_success and not self.aborted and self.action_result_code in (None, 0)

    @property
    def total_fees(self) -> int:
        return int(self.parsed.total_fees.grams)

    @property
    def bounced_in(self) -> bool:
        """The inbound message is a bounce."""
        return bool(self.in_msg and self.in_msg.bounced)

    @property
    def bounced_out(self) -> list[Message]:
        """Outbound messages that are bounces (this transaction bounced its inbound value)."""
        return [m for m in self.out_msgs if m.bounced]

    @property
    def address(self) -> Address:
        return Address((0, self.parsed.account_addr)) if not self.account else Address(self.account)


@dataclass
class Trace:
    """Every transaction a message chain caused, in execution (BFS) order."""

    transactions: list[Transaction] = field(default_factory=list)

    @property
    def root(self) -> Transaction:
        return self.transactions[0]

    @property
    def total_gas_used(self) -> int:
        return sum(t.gas_used for t in self.transactions)

    @property
    def total_fees(self) -> int:
        return sum(t.fee for t in self.transactions)

    @property
    def all_success(self) -> bool:
        return all(t.success for t in self.transactions)

    def __len__(self) -> int:
        return len(self.transactions)

    def __iter__(self):
        return iter(self.transactions)


# ----------------------------------------------------------------- stack codec


def encode_stack(items: Sequence[Any]) -> list[list[Any]]:
    """Python values -> toncenter input stack.

    int -> num, Cell -> tvm.Cell, Slice/Address -> tvm.Slice, bytes (<=32) -> num.
    """
    out: list[list[Any]] = []
    for v in items:
        if isinstance(v, bool):
            out.append(["num", hex(-1 if v else 0)])
        elif isinstance(v, int):
            out.append(["num", hex(v) if v >= 0 else "-" + hex(-v)])
        elif isinstance(v, bytes):
            out.append(["num", hex(int.from_bytes(v, "big"))])
        elif isinstance(v, Cell):
            out.append(["tvm.Cell", base64.b64encode(v.to_boc()).decode()])
        elif isinstance(v, Slice):
            out.append(["tvm.Slice", base64.b64encode(v.to_cell().to_boc()).decode()])
        elif isinstance(v, Address):
            cell = Builder().store_address(v).end_cell()
            out.append(["tvm.Slice", base64.b64encode(cell.to_boc()).decode()])
        else:
            raise TypeError(f"cannot pass {type(v).__name__} to a get-method")
    return out


def _decode_cell_value(v: Any) -> Cell:
    if isinstance(v, dict):
        v = v.get("bytes", "")
    return Cell.one_from_boc(_b64(v))


def _decode_tl(entry: dict[str, Any]) -> Any:
    t = entry.get("@type", "")
    if t == "tvm.stackEntryNumber":
        n = entry["number"]["number"]
        return int(n)
    if t == "tvm.stackEntryCell":
        return _decode_cell_value(entry["cell"])
    if t == "tvm.stackEntrySlice":
        return _decode_cell_value(entry["slice"]).begin_parse()
    if t == "tvm.stackEntryTuple":
        return [_decode_tl(e) for e in entry["tuple"]["elements"]]
    if t == "tvm.stackEntryList":
        return [_decode_tl(e) for e in entry["list"]["elements"]]
    return None


def decode_stack(stack: Iterable[Sequence[Any]]) -> list[Any]:
    """toncenter output stack -> Python values (int, Cell, Slice, list, None)."""
    out: list[Any] = []
    for entry in stack:
        kind, value = entry[0], entry[1] if len(entry) > 1 else None
        if kind in ("num", "number", "int"):
            s = str(value)
            neg = s.startswith("-")
            s = s[1:] if neg else s
            n = int(s, 16) if s.lower().startswith("0x") else int(s)
            out.append(-n if neg else n)
        elif kind in ("cell", "tvm.Cell"):
            out.append(_decode_cell_value(value))
        elif kind in ("slice", "tvm.Slice"):
            out.append(_decode_cell_value(value).begin_parse())
        elif kind in ("tuple", "list"):
            elements = value.get("elements", []) if isinstance(value, dict) else []
            out.append([_decode_tl(e) for e in elements])
        elif kind == "null":
            out.append(None)
        else:
            raise ToncenterError(0, f"unsupported stack entry {kind!r}")
    return out


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


class ToncenterClient:
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
        devnet its own (``contracts.protocol.signed.DEVNET_GLOBAL_ID``). Every signed
        object names it, and the contracts refuse one signed for another network."""
        return (await self.get_config_param(19)).begin_parse().load_int(32)

    # -- waiting

    async def wait_for_transaction(
        self,
        address: Address | str,
        *,
        after_lt: int = 0,
        predicate: Callable[[Transaction], bool] | None = None,
        timeout: float = 60.0,
        interval: float = 0.2,
        on_poll: Callable[[], None] | None = None,
    ) -> Transaction:
        """Poll until a transaction with lt > after_lt (matching ``predicate``) appears.

        Returns the oldest match. Raises TimeoutError after ``timeout`` seconds.
        """
        addr = _addr(address)
        deadline = time.monotonic() + timeout
        delay = interval
        while True:
            txs = await self._transactions_after(addr, after_lt)
            for tx in reversed(txs):  # oldest first
                if predicate is None or predicate(tx):
                    return tx
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"no matching transaction on {addr.to_str()} after lt {after_lt} "
                    f"within {timeout:g}s"
                )
            if on_poll is not None:
                on_poll()
            await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 1.5, 2.0)

    async def _transactions_after(self, addr: Address, after_lt: int) -> list[Transaction]:
        """All transactions with lt > after_lt (newest first), paging as needed."""
        out: list[Transaction] = []
        lt: int | None = None
        h: bytes | None = None
        while True:
            page = await self.get_transactions(
                addr, limit=50, lt=lt, hash=h, to_lt=after_lt or None
            )
            full = len(page) == 50
            if lt is not None and page and page[0].lt == lt:
                page = page[1:]
            out.extend(t for t in page if t.lt > after_lt)
            # after_lt=0 means "any": the newest page is enough (no walk through history)
            if not full or not page or not after_lt or len(out) >= 1000:
                return out
            lt, h = page[-1].lt, page[-1].hash

    async def wait_for_message(
        self,
        sent: SentMessage | bytes,
        address: Address | str,
        *,
        after_lt: int = 0,
        timeout: float = 60.0,
        on_poll: Callable[[], None] | None = None,
    ) -> Transaction:
        """Wait for the transaction that processed an external message we sent."""
        norm = sent.hash_norm if isinstance(sent, SentMessage) else sent
        return await self.wait_for_transaction(
            address,
            after_lt=after_lt,
            predicate=lambda t: t.in_msg is not None and t.in_msg.hash_norm == norm,
            timeout=timeout,
            on_poll=on_poll,
        )

    async def wait_for_trace(
        self,
        root: Transaction,
        *,
        timeout: float = 60.0,
        on_poll: Callable[[], None] | None = None,
    ) -> Trace:
        """Follow out_msgs to their destinations until the whole chain has executed.

        External-out messages (no destination) end a branch. Raises TimeoutError.
        """
        deadline = time.monotonic() + timeout
        trace = Trace([root])
        queue = [root]
        while queue:
            tx = queue.pop(0)
            waits: list[Awaitable[Transaction]] = []
            for msg in tx.out_msgs:
                if not msg.destination:
                    continue
                waits.append(
                    self.wait_for_transaction(
                        msg.destination,
                        after_lt=msg.created_lt,
                        predicate=_in_msg_is(msg),
                        timeout=max(0.1, deadline - time.monotonic()),
                        on_poll=on_poll,
                    )
                )
            for child in await asyncio.gather(*waits):
                trace.transactions.append(child)
                queue.append(child)
        return trace

    async def send_and_trace(
        self,
        boc: bytes | Cell,
        address: Address | str,
        *,
        timeout: float = 60.0,
        on_poll: Callable[[], None] | None = None,
    ) -> Trace:
        """Send an external message to ``address`` and wait for every transaction it causes."""
        info = await self.get_address_information(address)
        sent = await self.send_boc_return_hash(boc)
        root = await self.wait_for_message(
            sent, address, after_lt=info.last_transaction_lt, timeout=timeout, on_poll=on_poll
        )
        return await self.wait_for_trace(root, timeout=timeout, on_poll=on_poll)


def _in_msg_is(msg: Message) -> Callable[[Transaction], bool]:
    def check(t: Transaction) -> bool:
        if t.in_msg is None:
            return False
        if msg.hash and t.in_msg.hash:
            return t.in_msg.hash == msg.hash
        return t.in_msg.created_lt == msg.created_lt and t.in_msg.source == msg.source

    return check


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


def _addr(address: Address | str) -> Address:
    if isinstance(address, Address):
        return address
    try:
        return Address(address)
    except Exception as e:  # pytoniq_core raises several types
        raise ToncenterError(416, f"Incorrect address: {address!r}") from e


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
