"""`imago up` and `imago down`: the whole system on loopback, for a developer's machine.

`up` starts, in order, the devnet (and deploys the contracts, funds dev wallets and
opens the client's escrow on it), the matcher, one node with the embedded model
(registered on-chain as a Provider with stake, its dev image and model allowed on the
Registry), and the client gateway paying from that escrow. Each runs as a detached
process logging to ``$IMAGO_HOME/logs/``. It waits for each to answer, records what
runs in ``$IMAGO_HOME/stack.json`` (which the `chat` command and `down` read) and prints
where everything is. The devnet's state, the deployment and the wallets persist in
``$IMAGO_HOME`` across `down` and `up`.
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
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pytoniq_core import Address

from contracts.chain.addresses import provider_address
from contracts.chain.devnet import pid_alive
from contracts.chain.wallet import read_keystore_header
from protocol.attestation import DEV_MEASUREMENT, image_hash
from protocol.home import (
    client_dir,
    deployment_file,
    escrow_record,
    imago_home,
    key_file,
    logs_dir,
    matcher_dir,
    node_dir,
    spend_key_file,
    stack_file,
    wallet_file,
)
from protocol.signed import model_hash

DEFAULT_PORTS = {"devnet": 8600, "matcher": 8700, "node": 8800, "gateway": 8900}
DEFAULT_ENGINE_PORT = 8801  # the node's vLLM, on loopback
START_TIMEOUT_S = {"devnet": 30.0, "matcher": 30.0, "node": 300.0, "gateway": 30.0}


class StackError(RuntimeError):
    """The stack could not be brought up or down; the message says what to do."""


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
    # `imago gateway` started by hand takes it, like the rest, as its default.
    devnet: bool = False
    escrow: str = ""
    vault: str = ""
    chain_url: str = ""
    registry: str = ""
    provider: str = ""

    @classmethod
    def path(cls, home: Path) -> Path:
        return stack_file(home)

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
        self.logs = logs_dir(home)
        self.state = StackState()

    def say(self, message: str) -> None:
        if not self.quiet:
            print(message, file=sys.stderr, flush=True)

    def url(self, name: str) -> str:
        return f"http://{self.host}:{self.ports[name]}"

    def spawn(
        self, name: str, args: list[str], ready: Callable[[], bool]
    ) -> subprocess.Popen[bytes]:
        """Start one service detached and wait until ``ready()``."""
        log_path = self.logs / f"{name}.log"
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "imago.cli", *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        self.state.services.append(Service(name, process.pid, self.url(name), str(log_path)))
        self.state.save(self.home)
        self.wait(name, process, ready)
        return process

    def wait(self, name: str, process: subprocess.Popen[bytes], ready: Callable[[], bool]) -> None:
        log_path = self.logs / f"{name}.log"
        started = time.monotonic()
        shown = -1
        while not ready():
            if process.poll() is not None:
                raise StackError(
                    f"{name} exited with code {process.returncode}; see {log_path}:\n"
                    + tail(log_path)
                )
            waited = time.monotonic() - started
            if waited > START_TIMEOUT_S[name]:
                raise StackError(f"{name} did not become ready in time; see {log_path}")
            if int(waited) // 5 != shown and waited >= 5:
                shown = int(waited) // 5
                self.say(f"  … waiting for {name} ({int(waited)} s)")
            time.sleep(0.25)
        self.say(f"  {name:<8} {self.url(name)}  (pid {process.pid}, log {log_path})")


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
    if not args.upstream:
        ports["engine"] = args.engine_port
    taken = [f"{n} port {p}" for n, p in ports.items() if not port_is_free(args.host, p)]
    if taken:
        print(
            f"error: {', '.join(taken)} already in use on {args.host}; free it or choose "
            "another with --devnet-port/--matcher-port/--node-port/--gateway-port/--engine-port",
            file=sys.stderr,
        )
        return 2
    logs_dir(home).mkdir(parents=True, exist_ok=True)
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
            f'  imago chat "What is the capital of France? Answer in one sentence."\n'
            f"  OpenAI(base_url='{state.gateway_url}/v1', api_key='imago')\n"
            f"Logs in {logs_dir(home)}; `imago down` stops everything."
        )
    return 0


def launch(launcher: StackLauncher, args: argparse.Namespace) -> None:
    state = launcher.state
    home = launcher.home
    state.matcher_url = launcher.url("matcher")
    state.gateway_url = launcher.url("gateway")
    state.devnet = True  # the stack runs on its own devnet: dev attestations are fine there
    launcher.say("Starting Imago on loopback:")
    start_devnet(launcher)
    setup_chain(launcher)
    launcher.spawn(
        "matcher",
        [
            "matcher", "serve", "--devnet",
            "--host", launcher.host, "--port", str(launcher.ports["matcher"]),
            "--state-dir", str(matcher_dir(home)), "--vault", state.vault,
            "--chain", state.chain_url, "--registry", state.registry,
            # it settles by itself, on the devnet's short clock: an epoch every 30 s and
            # every committed nanoton charged at once (the defaults elsewhere: an hour, 10 TON)
            "--operator-wallet", str(wallet_file("operator", home)),
            "--operator-key", str(key_file("operator", home)),
            "--epoch-seconds", str(DEVNET_EPOCH_S), "--charge-threshold", "0.000000001",
            "--settle-every", "2",
        ],
        lambda: http_ok(f"{state.matcher_url}/health"),
    )  # fmt: skip
    node_args = [
        "node", "serve", "--devnet", "--attestation", "dev",
        "--host", launcher.host, "--port", str(launcher.ports["node"]),
        "--matcher", state.matcher_url, "--public-url", launcher.url("node"),
        "--state-dir", str(node_dir(home)), "--provider", state.provider,
        # the claim loop: the Provider's owner collects its payouts (claim multiple 0 here),
        # looking every few seconds, as the matcher settles every 30 s
        "--chain", state.chain_url, "--claim-wallet", "provider", "--claim-every", "5",
    ]  # fmt: skip
    if args.upstream:
        node_args += ["--upstream", args.upstream]
    else:
        node_args += ["--engine-port", str(args.engine_port)]
    # The matcher admits the node only once its Provider is staked with the node's key,
    # which the node makes at its first start, and once the Registry allows its image
    # and models: do both while its engine warms up, at once (two wallets, no seqno race).
    node = launcher.spawn("node", node_args, lambda: http_ok(f"{launcher.url('node')}/v1/identity"))
    stop = threading.Event()
    with ThreadPoolExecutor(max_workers=1) as pool:
        allowing = pool.submit(allow_on_registry, launcher, stop)
        try:
            register_provider(launcher)
            launcher.wait("node", node, lambda: node_admitted(state.matcher_url, allowing))
        finally:
            stop.set()
        allowing.result()
    models = http_json(f"{state.matcher_url}/v1/models")["data"]
    state.model = models[0]["id"]
    launcher.spawn(
        "gateway",
        [
            "gateway", "--devnet",
            "--host", launcher.host, "--port", str(launcher.ports["gateway"]),
            "--matcher", state.matcher_url, "--state-dir", str(client_dir(home)),
            "--escrow", state.escrow, "--vault", state.vault,
            "--chain", state.chain_url, "--registry", state.registry,
        ],
        lambda: http_ok(f"{state.gateway_url}/v1/models"),
    )  # fmt: skip
    state.save(home)


DEVNET_EPOCH_S = 30
OPERATOR_FUNDS_TON = "300"
CLIENT_FUNDS_TON = "50"
CLIENT_ESCROW_TON = "20"
PROVIDER_FUNDS_TON = "50"
PROVIDER_STAKE_TON = "12"


def run_imago(home: Path, *args: str) -> dict:
    """Run one `imago … --json` command against this home and return its JSON."""
    result = subprocess.run(
        [sys.executable, "-m", "imago.cli", *args, "--json"],
        env={**os.environ, "IMAGO_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    if result.returncode != 0:
        raise StackError(f"`imago {' '.join(args)}` failed: {result.stderr.strip()}")
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


def try_imago(home: Path, *args: str) -> dict:
    """Like run_imago, but a failure (e.g. a contract not deployed yet) gives {}."""
    try:
        return run_imago(home, *args)
    except StackError:
        return {}


def start_devnet(launcher: StackLauncher) -> None:
    port = str(launcher.ports["devnet"])
    devnet = run_imago(launcher.home, "devnet", "up", "--port", port)
    service = Service("devnet", devnet["pid"], devnet["url"], devnet["log_file"])
    launcher.state.services.append(service)
    launcher.state.chain_url = devnet["url"]
    launcher.state.save(launcher.home)
    launcher.say(f"  {'devnet':<8} {service.url}  (pid {service.pid}, log {service.log})")


def ensure_wallet(home: Path, name: str, funds_ton: str) -> None:
    if not wallet_file(name, home).exists():
        run_imago(home, "wallet", "new", "--name", name)
        run_imago(home, "wallet", "faucet", funds_ton, "--name", name)


def setup_chain(launcher: StackLauncher) -> None:
    """Deploy the contract set and open the client's escrow, unless the devnet has them."""
    home, state = launcher.home, launcher.state
    ensure_wallet(home, "operator", OPERATOR_FUNDS_TON)
    if not deployment_file(home).exists():
        launcher.say("  deploying the contracts (Registry, Vault) …")
        run_imago(home, "registry", "deploy", "--all", "--name", "operator")
    deployment = json.loads(deployment_file(home).read_text())
    state.registry = deployment["registry"]
    state.vault = next(iter(deployment["vaults"].values()))  # the operator's (--all)
    ensure_wallet(home, "provider", PROVIDER_FUNDS_TON)
    owner = read_keystore_header(wallet_file("provider", home))["address"]
    # Derived, so the node can name its Provider before it is staked (seq 0).
    state.provider = provider_address(Address(state.registry), Address(owner), 0).to_str(
        is_user_friendly=False
    )
    ensure_wallet(home, "client", CLIENT_FUNDS_TON)
    # `imago escrow open` pays from the gateway's spend key (client/spend.key, made if
    # missing) and records the escrow beside it (client/escrow.json).
    record = escrow_record(client_dir(home))
    escrow = {}
    if record.exists():
        address = json.loads(record.read_text())["escrow"]
        escrow = try_imago(home, "escrow", "status", "--name", "client", "--address", address)
        if escrow.get("state") not in (None, "open"):
            # A closing or closed escrow takes no more deposits, and its address is
            # fixed by the spend key: open a fresh one under a new key.
            retire(spend_key_file(client_dir(home)))
            escrow = {}
    if escrow.get("state") != "open":
        launcher.say(f"  opening the client's escrow with {CLIENT_ESCROW_TON} TON …")
        escrow = run_imago(
            home, "escrow", "open", "--amount", CLIENT_ESCROW_TON, "--name", "client"
        )
    state.escrow = escrow["escrow"]
    launcher.say(f"  escrow   {state.escrow} ({escrow.get('available', '?')} TON available)")


def retire(path: Path) -> None:
    """Keep an old key file beside its successor rather than delete it."""
    path.replace(path.with_name(f"{path.name}.{int(time.time())}.retired"))


def register_provider(launcher: StackLauncher) -> None:
    """Stake the node on-chain as a Provider, with the prices it announces."""
    home, state = launcher.home, launcher.state
    node_url = launcher.url("node")
    identity = http_json(f"{node_url}/v1/identity")
    offers = http_json(f"{node_url}/v1/status")["models"]
    status = try_imago(home, "provider", "status", "--name", "provider")
    if status.get("state") == "active":
        if status.get("node_key") != identity["ed25519_public"]:
            run_imago(home, "provider", "rotate-key", "--name", "provider",
                      "--node-key", identity["ed25519_public"])  # fmt: skip
    else:
        models = [f"{o['id']}:{o['price_prompt']}:{o['price_completion']}" for o in offers]
        status = run_imago(
            home, "provider", "register", "--name", "provider",
            "--stake", PROVIDER_STAKE_TON, "--node-key", identity["ed25519_public"],
            *(arg for model in models for arg in ("--model", model)),
        )  # fmt: skip
    state.provider = status["provider"]
    launcher.say(f"  provider {state.provider} (stake {status.get('stake')} TON)")


def allow_on_registry(launcher: StackLauncher, stop: threading.Event) -> None:
    """As governance (the operator's wallet deployed the Registry), allow the dev image
    at once, and the node's models as soon as it lists them (once its engine is ready;
    it registers with the matcher only then, and retries a refusal within seconds).
    Allowing again is harmless, so a second `up` on the same devnet checks nothing."""
    home = launcher.home
    image = f"{image_hash(DEV_MEASUREMENT):064x}"
    run_imago(home, "registry", "allow-image", image, "--name", "operator")
    offers: list[dict] = []
    while not offers:
        if stop.wait(0.25):  # the launch failed or is over
            return
        with contextlib.suppress(urllib.error.URLError, OSError, KeyError, ValueError):
            offers = http_json(f"{launcher.url('node')}/v1/status")["models"]
    for offer in offers:  # by hash: the CLI would read a 64-character id as one
        run_imago(home, "registry", "allow-model", f"{model_hash(offer['id']):064x}",
                  "--name", "operator")  # fmt: skip
    names = ", ".join(offer["id"] for offer in offers)
    launcher.say(f"  registry allows the dev image and {names}")


def node_admitted(matcher_url: str, allowing: Future[None]) -> bool:
    if allowing.done():
        allowing.result()  # its StackError now, not a timeout waiting for a refused node
    return matcher_has_nodes(matcher_url)


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
    up_parser.add_argument("--engine-port", type=int, default=DEFAULT_ENGINE_PORT)
    up_parser.add_argument(
        "--upstream", help="attach the node to a running OpenAI-compatible server"
    )
    up_parser.add_argument("--json", action="store_true", help="print the stack as JSON")
    up_parser.set_defaults(func=up)
    down_parser = subparsers.add_parser("down", help="stop everything `imago up` started")
    down_parser.add_argument("--json", action="store_true")
    down_parser.set_defaults(func=down)
