"""Start, stop and inspect the local devnet (contracts/devnet/server.mjs).

A state directory holds everything of one devnet: ``state.json`` (accounts and
history), ``devnet.log`` (stdout and stderr of the node process) and
``devnet.pid`` (JSON: pid, port, url). Used by ``imago devnet`` and by the test
fixtures alike:

    with DevnetProcess(tmp_path, port=0) as dn:       # a free port
        async with dn.client() as chain:
            await chain.faucet(address, parse_ton("5"))
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pytoniq_core import Address

from protocol.home import devnet_dir

from .toncenter import ToncenterClient, ToncenterError

__all__ = [
    "DEFAULT_PORT",
    "SERVER_PATH",
    "DevnetClient",
    "DevnetError",
    "DevnetProcess",
    "DevnetStatus",
    "FaucetResult",
    "free_port",
    "is_devnet",
    "pid_alive",
    "read_status",
    "start_background",
    "stop_background",
]

DEFAULT_PORT = 8600
PACKAGE_DIR = (
    Path(__file__).resolve().parent.parent
)  # contracts/: the devnet sources and node_modules
SERVER_PATH = PACKAGE_DIR / "devnet" / "server.mjs"
NODE_MODULES = PACKAGE_DIR / "node_modules"
PID_FILE = "devnet.pid"
LOG_FILE = "devnet.log"
STATE_FILE = "state.json"


class DevnetError(RuntimeError):
    """The devnet could not be started, found or stopped."""


def free_port(host: str = "127.0.0.1") -> int:
    """An ephemeral port that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _node_binary() -> str:
    node = shutil.which("node")
    if node is None:
        raise DevnetError("`node` is not on PATH: install Node.js 20 (scripts/bootstrap.sh)")
    return node


def _check_install() -> None:
    if not SERVER_PATH.exists():
        raise DevnetError(f"devnet server not found at {SERVER_PATH}")
    if not (NODE_MODULES / "@ton" / "sandbox").exists():
        raise DevnetError(
            f"{NODE_MODULES} lacks @ton/sandbox: run `npm ci` in {PACKAGE_DIR} "
            "(scripts/bootstrap.sh does it)"
        )


@dataclass(frozen=True)
class DevnetStatus:
    """What ``devnet.pid`` says, checked against the live process."""

    running: bool
    pid: int | None
    port: int | None
    url: str | None
    state_dir: Path
    log_file: Path


@dataclass(frozen=True)
class FaucetResult:
    hash: bytes  # hash of the receiver's transaction
    lt: int  # its logical time
    amount: int
    transactions: int


class DevnetClient(ToncenterClient):
    """The toncenter adapter plus the devnet-only endpoints under ``/devnet/``."""

    async def _devnet(self, name: str, body: dict[str, Any] | None = None) -> Any:
        return await self.call(f"devnet/{name}", body, post=body is not None)

    async def faucet(
        self, address: Address | str, amount: int, *, bounce: bool = False
    ) -> FaucetResult:
        """Send ``amount`` nanoTON from the devnet treasury; returns once executed."""
        addr = address if isinstance(address, Address) else Address(address)
        r = await self.call(
            "devnet/faucet",
            {
                "address": addr.to_str(is_user_friendly=False),
                "amount": str(amount),
                "bounce": bounce,
            },
            post=True,
        )
        return FaucetResult(
            hash=base64.b64decode(r["hash"]),
            lt=int(r["lt"]),
            amount=int(r["amount"]),
            transactions=int(r["transactions"]),
        )

    async def clock(self) -> tuple[int, bool]:
        """(now, pinned)."""
        r = await self.call("devnet/clock")
        return int(r["now"]), bool(r["pinned"])

    async def set_clock(self, now: int | None) -> int:
        """Pin the devnet's unix time (``None`` unpins: it follows wall time again)."""
        r = await self.call("devnet/clock", {"now": now}, post=True)
        return int(r["now"])

    async def health(self) -> dict[str, Any]:
        return await self.call("devnet/health")

    async def storage_stat(self, address: Address | str) -> tuple[int, int]:
        """(cells, bits) the account's storage fees are charged on (the emulator's stat)."""
        addr = address if isinstance(address, Address) else Address(address)
        r = await self.call("devnet/storage", {"address": addr.to_str(is_user_friendly=False)})
        return int(r["cells"]), int(r["bits"])

    async def flush(self) -> None:
        """Write the state file now instead of after the debounce delay."""
        await self.call("devnet/flush", {}, post=True)


async def is_devnet(chain_url: str) -> bool:
    """Whether ``chain_url`` is an Imago devnet: only it answers ``/devnet/health``.
    Dev attestations are acceptable only there, so a false answer here is what keeps a
    matcher on testnet or mainnet from admitting software-only "TEEs"."""
    client = DevnetClient(chain_url, max_retries=1, timeout=5.0)
    try:
        return (await client.health()).get("status") == "ok"
    except (ToncenterError, ValueError, TypeError, AttributeError):
        return False
    finally:
        await client.close()


class DevnetProcess:
    """One devnet node process bound to a state directory.

    ``port=0`` picks a free port. ``detach=True`` starts it in its own session so it
    outlives this Python process (``imago devnet up``); otherwise it is a child that
    ``stop()`` (or leaving the ``with`` block) terminates.
    """

    def __init__(
        self,
        state_dir: str | Path,
        port: int = 0,
        *,
        host: str = "127.0.0.1",
        detach: bool = False,
        ready_timeout: float = 20.0,
        history_limit: int = 1000,
    ):
        self.state_dir = Path(state_dir)
        self.host = host
        self.requested_port = port
        self.detach = detach
        self.ready_timeout = ready_timeout
        self.history_limit = history_limit
        self.port: int | None = None
        self.pid: int | None = None
        self.startup_seconds: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise DevnetError("devnet is not started")
        return f"http://{self.host}:{self.port}"

    @property
    def log_file(self) -> Path:
        return self.state_dir / LOG_FILE

    @property
    def state_file(self) -> Path:
        return self.state_dir / STATE_FILE

    def client(self, **kwargs: Any) -> DevnetClient:
        return DevnetClient(self.url, **kwargs)

    def start(self) -> DevnetProcess:
        _check_install()
        node = _node_binary()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_file, "ab")  # noqa: SIM115 - handed to the child
        offset = log.tell()
        # IMAGO_DEVNET_NODE_ARGS: extra node flags for debugging, e.g. "--cpu-prof"
        extra = shlex.split(os.environ.get("IMAGO_DEVNET_NODE_ARGS", ""))
        cmd = [
            node,
            *extra,
            str(SERVER_PATH),
            "--port",
            str(self.requested_port),
            "--host",
            self.host,
            "--state",
            str(self.state_file),
            "--history-limit",
            str(self.history_limit),
        ]
        t0 = time.monotonic()
        try:
            self._proc = subprocess.Popen(
                cmd,
                cwd=str(PACKAGE_DIR),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=self.detach,
            )
        finally:
            log.close()
        self.pid = self._proc.pid
        ready = self._wait_ready(offset)
        self.startup_seconds = time.monotonic() - t0
        self.port = int(ready["port"])
        (self.state_dir / PID_FILE).write_text(
            json.dumps(
                {
                    "pid": self.pid,
                    "port": self.port,
                    "host": self.host,
                    "url": self.url,
                    "started_at": int(time.time()),
                }
            )
        )
        return self

    def _wait_ready(self, offset: int) -> dict[str, Any]:
        deadline = time.monotonic() + self.ready_timeout
        assert self._proc is not None
        while True:
            with open(self.log_file, "rb") as f:
                f.seek(offset)
                for line in f.read().splitlines():
                    if not line.startswith(b"{"):
                        continue
                    try:
                        event = json.loads(line)
                    except ValueError:
                        continue
                    if event.get("event") == "ready":
                        return event
                    if event.get("event") == "error":
                        self._reap()
                        raise DevnetError(_explain(event.get("error", ""), self.requested_port))
            if self._proc.poll() is not None:
                raise DevnetError(
                    f"devnet exited with code {self._proc.returncode}; see {self.log_file}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise DevnetError(
                    f"devnet not ready within {self.ready_timeout:g}s; see {self.log_file}"
                )
            time.sleep(0.02)

    def _reap(self) -> None:
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=5)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (the server saves its state), then SIGKILL after ``timeout``."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=5)
        with contextlib.suppress(FileNotFoundError):
            pid_file = self.state_dir / PID_FILE
            if json.loads(pid_file.read_text()).get("pid") == self.pid:
                pid_file.unlink()
        self._proc = None

    def __enter__(self) -> DevnetProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _explain(error: str, port: int) -> str:
    if "EADDRINUSE" in error:
        return f"port {port} is already in use: stop what holds it or pick another with --port"
    if "EACCES" in error:
        return f"not allowed to listen on port {port}: pick another with --port"
    return f"devnet failed to start: {error}"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie still answers kill(0); look at /proc when there is one
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def _is_devnet(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return pid_alive(pid)  # no /proc: trust the pid file
    return SERVER_PATH.name.encode() in cmdline


def read_status(state_dir: str | Path | None = None) -> DevnetStatus:
    """Status from the pid file; ``running`` only if that pid is a live devnet."""
    sd = Path(state_dir) if state_dir is not None else devnet_dir()
    pid_file = sd / PID_FILE
    try:
        info = json.loads(pid_file.read_text())
    except (FileNotFoundError, ValueError):
        return DevnetStatus(False, None, None, None, sd, sd / LOG_FILE)
    pid = int(info["pid"])
    running = pid_alive(pid) and _is_devnet(pid)
    return DevnetStatus(running, pid, int(info["port"]), info.get("url"), sd, sd / LOG_FILE)


def start_background(
    state_dir: str | Path | None = None, port: int = DEFAULT_PORT, host: str = "127.0.0.1"
) -> DevnetProcess:
    """Start a detached devnet (``imago devnet up``); error if one already runs there."""
    sd = Path(state_dir) if state_dir is not None else devnet_dir()
    st = read_status(sd)
    if st.running:
        raise DevnetError(f"a devnet already runs from {sd} (pid {st.pid}, {st.url})")
    proc = DevnetProcess(sd, port, host=host, detach=True)
    proc.start()
    return proc


def stop_background(state_dir: str | Path | None = None, timeout: float = 10.0) -> bool:
    """Stop the devnet of a state directory; False if none was running."""
    sd = Path(state_dir) if state_dir is not None else devnet_dir()
    st = read_status(sd)
    pid_file = sd / PID_FILE
    if not st.running or st.pid is None:
        pid_file.unlink(missing_ok=True)
        return False
    os.kill(st.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pid_alive(st.pid):
        if time.monotonic() > deadline:
            os.kill(st.pid, signal.SIGKILL)
            time.sleep(0.2)
            break
        time.sleep(0.05)
    pid_file.unlink(missing_ok=True)
    return True


__all__ += ["ToncenterError"]
