"""A real API server for the REST tests: `python -m webui --nowebui` on a free loopback port, tiny checkpoints.
Started once per test session; tests talk to it over real HTTP."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_SECONDS = 120


@dataclass(frozen=True)
class ApiServer:
    url: str
    data_dir: Path
    process: subprocess.Popen[str]
    log: Path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# Any connection the server tries to make off this machine goes to a closed loopback port (refused at once), and
# git may use local repositories only: fuzzed URLs must neither leave the machine nor wait on a timeout.
OFFLINE_ENV = {
    **{name: "http://127.0.0.1:9" for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy",
                                               "all_proxy")},
    "NO_PROXY": "127.0.0.1,localhost,::1", "no_proxy": "127.0.0.1,localhost,::1", "GIT_ALLOW_PROTOCOL": "file",
}


def start_server(data_dir: Path, extra_flags: list[str], log: Path) -> ApiServer:
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "GRADIO_TEMP_DIR": str(data_dir / "gradio-tmp"),
           "HF_HOME": str(data_dir / "hf-home"), **OFFLINE_ENV}
    handle = log.open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "webui", "--nowebui", "--data-dir", str(data_dir), "--port", str(port), *extra_flags],
        stdout=handle, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"API server exited with {process.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"{url}/openapi.json", timeout=5):
                return ApiServer(url, data_dir, process, log)
        except urllib.error.HTTPError:
            return ApiServer(url, data_dir, process, log)  # answering (e.g. 401 with auth): up
        except OSError:
            time.sleep(0.2)
    process.terminate()
    raise RuntimeError(f"API server did not answer within {START_TIMEOUT_SECONDS} s:\n{log.read_text()}")


def stop_server(server: ApiServer) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.process.kill()


def data_dir_with_models(base: Path, tiny_model_dir: Path) -> Path:
    models = base / "models" / "Stable-diffusion"
    models.parent.mkdir(parents=True)
    shutil.copytree(tiny_model_dir, models)
    return base


@pytest.fixture(scope="session")
def api_server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[ApiServer]:
    """The shared server (no auth) with tiny.safetensors and tiny_b.safetensors."""
    data_dir = data_dir_with_models(tmp_path_factory.mktemp("api-data"), tiny_model_dir)
    server = start_server(data_dir, [], data_dir / "server.log")
    yield server
    stop_server(server)


@pytest.fixture(scope="session")
def authed_api_server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[ApiServer]:
    """A second server started with --api-auth alice:secret1,bob:secret2."""
    data_dir = data_dir_with_models(tmp_path_factory.mktemp("api-auth-data"), tiny_model_dir)
    server = start_server(data_dir, ["--api-auth", "alice:secret1,bob:secret2"], data_dir / "server.log")
    yield server
    stop_server(server)
