"""A real ``tritonserver`` on this machine, from the ``nvidia-pytriton`` wheel (test and bench helper).

The wheel ships the server binary, its libraries, the Python backend and one Python-backend stub per Python
version. The stub embeds the interpreter: it needs this interpreter's shared ``libpython`` (``sysconfig``'s
``LIBDIR``) on ``LD_LIBRARY_PATH`` and this environment's ``bin`` first on ``PATH`` (that is how it finds the
environment's packages, prumerge included). The backend and the stub for this Python are copied into a backend
directory of our own. The server listens on 127.0.0.1 only, on free ports, and is always stopped by its PID.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path


def pytriton_root() -> Path | None:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(spec.submodule_search_locations[0]) / "tritonserver"
    return root if (root / "bin" / "tritonserver").is_file() else None


def _stub(root: Path) -> Path:
    return root / "python_backend_stubs" / f"{sys.version_info.major}.{sys.version_info.minor}" / "triton_python_backend_stub"


def available() -> str | None:
    """None when a local server can run here, else why not."""
    root = pytriton_root()
    if root is None:
        return "nvidia-pytriton (the tritonserver binary) is not installed"
    if not _stub(root).is_file():
        return f"nvidia-pytriton has no Python-backend stub for Python {sys.version_info.major}.{sys.version_info.minor}"
    if importlib.util.find_spec("tritonclient") is None:
        return "tritonclient is not installed"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalTriton:
    def __init__(self, model_repository: Path, workdir: Path, config_name: str | None = "cpu") -> None:
        self.repository, self.workdir, self.config_name = Path(model_repository), Path(workdir), config_name
        self.http_port, self.grpc_port = free_port(), free_port()
        self.process: subprocess.Popen | None = None
        self.log = self.workdir / "tritonserver.log"

    @property
    def http(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self, timeout: float = 120) -> "LocalTriton":
        from pytriton.utils.distribution import get_libs_path

        root = pytriton_root()
        backends = self.workdir / "backends"
        shutil.copytree(root / "backends" / "python", backends / "python", dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(_stub(root), backends / "python" / "triton_python_backend_stub")
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = ":".join(p for p in (sysconfig.get_config_var("LIBDIR"), str(get_libs_path()),
                                                      env.get("LD_LIBRARY_PATH")) if p)
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
        cmd = [str(root / "bin" / "tritonserver"), "--model-repository", str(self.repository),
               "--backend-directory", str(backends), "--http-address", "127.0.0.1", "--http-port", str(self.http_port),
               "--grpc-address", "127.0.0.1", "--grpc-port", str(self.grpc_port), "--allow-metrics", "false",
               "--log-info", "true", "--exit-timeout-secs", "5"]
        if self.config_name:
            cmd += ["--model-config-name", self.config_name]
        self.process = subprocess.Popen(cmd, stdout=self.log.open("w"), stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited with {self.process.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"http://{self.http}/v2/health/ready", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"tritonserver not ready after {timeout} s:\n{self.tail()}")

    def stats(self, model: str) -> dict:
        with urllib.request.urlopen(f"http://{self.http}/v2/models/{model}/stats", timeout=10) as r:
            return json.loads(r.read())

    def tail(self, lines: int = 40) -> str:
        """The log's first lines (where an option error is) and its last ones."""
        if not self.log.exists():
            return ""
        text = self.log.read_text(errors="replace").splitlines()
        return "\n".join(text if len(text) <= 2 * lines else [*text[:lines], "...", *text[-lines:]])

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)  # the server and the Python stubs it started
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def __enter__(self) -> "LocalTriton":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
