"""`imago up` and `imago down`: the whole system on loopback, for a developer's machine.

`up` starts, in order, the devnet, the matcher, one node with the embedded model and
the client gateway, each as a detached process logging to ``$IMAGO_HOME/logs/``. It
waits for each to answer, records what runs in ``$IMAGO_HOME/stack.json`` (which the
`chat` command and `down` read) and prints where everything is.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

DEFAULT_PORTS = {"devnet": 8600, "matcher": 8700, "node": 8800, "gateway": 8900}
START_TIMEOUT_S = {"devnet": 30.0, "matcher": 30.0, "node": 300.0, "gateway": 30.0}


class StackError(RuntimeError):
    """The stack could not be brought up or down; the message says what to do."""


def imago_home() -> Path:
    return Path(os.environ.get("IMAGO_HOME", Path.home() / ".imago"))


@dataclass
class Service:
    name: str
    pid: int
    url: str
    log: str


@dataclass
class StackState:
    services: list[Service] = field(default_factory=list)
    matcher_url: str = ""
    gateway_url: str = ""
    model: str = ""
    escrow: str = ""
    vault: str = ""
    chain_url: str = ""

    @classmethod
    def path(cls, home: Path) -> Path:
        return home / "stack.json"

    @classmethod
    def load(cls, home: Path) -> StackState | None:
        try:
            raw = json.loads(cls.path(home).read_text())
        except FileNotFoundError:
            return None
        raw["services"] = [Service(**s) for s in raw.get("services", [])]
        return cls(**raw)

    def save(self, home: Path) -> None:
        tmp = self.path(home).with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.replace(self.path(home))


def port_is_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def http_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


class StackLauncher:
    def __init__(self, home: Path, host: str, ports: dict[str, int], quiet: bool) -> None:
        self.home = home
        self.host = host
        self.ports = ports
        self.quiet = quiet
        self.logs = home / "logs"
        self.state = StackState()

    def say(self, message: str) -> None:
        if not self.quiet:
            print(message, file=sys.stderr, flush=True)

    def url(self, name: str) -> str:
        return f"http://{self.host}:{self.ports[name]}"

    def spawn(self, name: str, args: list[str], ready: Callable[[], bool]) -> Service:
        log_path = self.logs / f"{name}.log"
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "client.cli", *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        service = Service(name, process.pid, self.url(name), str(log_path))
        self.state.services.append(service)
        self.state.save(self.home)
        deadline = time.monotonic() + START_TIMEOUT_S[name]
        started = time.monotonic()
        shown = -1
        while not ready():
            if process.poll() is not None:
                raise StackError(
                    f"{name} exited with code {process.returncode}; see {log_path}:\n"
                    + tail(log_path)
                )
            if time.monotonic() > deadline:
                raise StackError(f"{name} did not become ready in time; see {log_path}")
            waited = int(time.monotonic() - started)
            if waited // 5 != shown and waited >= 5:
                shown = waited // 5
                self.say(f"  … waiting for {name} ({waited} s)")
            time.sleep(0.25)
        self.say(f"  {name:<8} {service.url}  (pid {process.pid}, log {log_path})")
        return service


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return ""


def up(args: argparse.Namespace) -> int:
    home = imago_home()
    previous = StackState.load(home)
    if previous and any(pid_alive(s.pid) for s in previous.services):
        print(f"Imago is already up (see {StackState.path(home)}); `imago down` stops it.")
        return 1
    ports = {name: getattr(args, f"{name}_port") for name in DEFAULT_PORTS}
    taken = [f"{n} port {p}" for n, p in ports.items() if not port_is_free(args.host, p)]
    if taken:
        print(
            f"error: {', '.join(taken)} already in use on {args.host}; free it or choose "
            "another with --devnet-port/--matcher-port/--node-port/--gateway-port",
            file=sys.stderr,
        )
        return 2
    (home / "logs").mkdir(parents=True, exist_ok=True)
    launcher = StackLauncher(home, args.host, ports, args.json)
    try:
        launch(launcher, args)
    except StackError as e:
        print(f"error: {e}", file=sys.stderr)
        down_services(home, quiet=True)
        return 1
    state = launcher.state
    if args.json:
        print(json.dumps(asdict(state), indent=2))
    else:
        print(
            f"\nImago is up. Model {state.model} on the gateway {state.gateway_url}/v1\n"
            f'  imago chat "What is the capital of France?"\n'
            f"  OpenAI(base_url='{state.gateway_url}/v1', api_key='imago')\n"
            f"Logs in {home / 'logs'}; `imago down` stops everything."
        )
    return 0


def launch(launcher: StackLauncher, args: argparse.Namespace) -> None:
    state = launcher.state
    home = launcher.home
    state.matcher_url = launcher.url("matcher")
    state.gateway_url = launcher.url("gateway")
    launcher.say("Starting Imago on loopback:")
    launcher.spawn(
        "matcher",
        [
            "matcher", "serve", "--devnet",
            "--host", launcher.host, "--port", str(launcher.ports["matcher"]),
            "--state-dir", str(home / "matcher"),
        ],
        lambda: http_ok(f"{state.matcher_url}/health"),
    )  # fmt: skip
    node_args = [
        "node", "serve", "--devnet", "--attestation", "dev",
        "--host", launcher.host, "--port", str(launcher.ports["node"]),
        "--matcher", state.matcher_url, "--public-url", launcher.url("node"),
        "--state-dir", str(home / "node"),
    ]  # fmt: skip
    if args.upstream:
        node_args += ["--upstream", args.upstream]
    launcher.spawn("node", node_args, lambda: matcher_has_nodes(state.matcher_url))
    models = http_json(f"{state.matcher_url}/v1/models")["data"]
    state.model = models[0]["id"]
    launcher.spawn(
        "gateway",
        [
            "client", "serve", "--devnet",
            "--host", launcher.host, "--port", str(launcher.ports["gateway"]),
            "--matcher", state.matcher_url, "--state-dir", str(home / "client"),
        ],
        lambda: http_ok(f"{state.gateway_url}/v1/models"),
    )  # fmt: skip
    state.save(home)


def matcher_has_nodes(matcher_url: str) -> bool:
    try:
        return bool(http_json(f"{matcher_url}/v1/models")["data"])
    except (urllib.error.URLError, OSError, KeyError, ValueError):
        return False


def down_services(home: Path, quiet: bool = False) -> list[str]:
    state = StackState.load(home)
    if state is None:
        return []
    stopped = []
    for service in reversed(state.services):
        if not pid_alive(service.pid):
            continue
        try:
            os.killpg(service.pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        deadline = time.monotonic() + 15
        while pid_alive(service.pid) and time.monotonic() < deadline:
            reap(service.pid)
            time.sleep(0.1)
        if pid_alive(service.pid):
            os.killpg(service.pid, signal.SIGKILL)
        stopped.append(service.name)
        if not quiet:
            print(f"  stopped {service.name} (pid {service.pid})", file=sys.stderr)
    StackState.path(home).unlink(missing_ok=True)
    return stopped


def reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def down(args: argparse.Namespace) -> int:
    stopped = down_services(imago_home(), quiet=args.json)
    if args.json:
        print(json.dumps({"stopped": stopped}))
    elif not stopped:
        print("Imago was not running.")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    up_parser = subparsers.add_parser("up", help="start the whole system on loopback")
    up_parser.add_argument("--host", default="127.0.0.1")
    for name, port in DEFAULT_PORTS.items():
        up_parser.add_argument(f"--{name}-port", type=int, default=port)
    up_parser.add_argument(
        "--upstream", help="attach the node to a running OpenAI-compatible server"
    )
    up_parser.add_argument("--json", action="store_true", help="print the stack as JSON")
    up_parser.set_defaults(func=up)
    down_parser = subparsers.add_parser("down", help="stop everything `imago up` started")
    down_parser.add_argument("--json", action="store_true")
    down_parser.set_defaults(func=down)
