"""End-to-end harness: the real `python -m webui` server (started once per session), black-hole proxies, headless Chromium.
Must not import webui (the app is driven from outside, over HTTP and through a browser) nor pytest-playwright."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.ui.blackhole import BlackHole

REPO_ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOT_DIR = REPO_ROOT / "docs" / "screenshots"
VIEWPORT = {"width": 1280, "height": 900}
# A cold start imports torch and gradio (≈5 s each on the 2-core CI machine); this is a hang guard, not a timing check.
SERVER_START_TIMEOUT_S = 240.0
# Playwright waits (ms): generous hang guards for a slow shared machine, never asserted as performance.
DEFAULT_TIMEOUT_MS = 60_000
LOG_TAIL_LINES = 60
FAILED_PAGE_TEXT_CHARS = 3000
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}

# Flags from the study in /work/shared/reference/web-on-this-machine.md (§2b): Chromium still tries Google services
# with all of them, so --proxy-server (added per session) sends whatever is left to a loopback black hole.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--disable-breakpad",
    "--disable-domain-reliability",
    "--disable-client-side-phishing-detection",
    "--metrics-recording-only",
    "--no-pings",
    "--password-store=basic",
    "--use-mock-keychain",
    "--disable-features=AutofillServerCommunication,OptimizationHints,MediaRouter,Translate,"
    "InterestFeedContentSuggestions,CertificateTransparencyComponentUpdater,DialMediaRouteProvider",
]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def is_loopback_url(url: str) -> bool:
    parts = urlsplit(url)
    if parts.scheme in ("data", "blob", "about", "chrome", "chrome-extension", "devtools"):
        return True
    return (parts.hostname or "") in LOOPBACK_HOSTS


def isolated_env(root: Path, proxy_url: str) -> dict[str, str]:
    """Environment for a child process: every cache, temp and config folder under `root`, the network via the black hole."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("GRADIO_") and key.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")}
    folders = {
        "GRADIO_TEMP_DIR": root / "gradio-temp",
        "HF_HOME": root / "hf-home",
        "TMPDIR": root / "tmp",
        "XDG_CACHE_HOME": root / "xdg-cache",
        "XDG_CONFIG_HOME": root / "xdg-config",
        "XDG_DATA_HOME": root / "xdg-data",
        "XDG_STATE_HOME": root / "xdg-state",
        "XDG_RUNTIME_DIR": root / "xdg-runtime",
        "MPLCONFIGDIR": root / "mpl",
    }
    for key, folder in folders.items():
        folder.mkdir(parents=True, exist_ok=True)
        env[key] = str(folder)
    (root / "xdg-runtime").chmod(0o700)
    env.update(
        GRADIO_ANALYTICS_ENABLED="False",
        HF_HUB_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONUNBUFFERED="1",
        HTTP_PROXY=proxy_url,
        HTTPS_PROXY=proxy_url,
        ALL_PROXY=proxy_url,
        http_proxy=proxy_url,
        https_proxy=proxy_url,
        all_proxy=proxy_url,
        # Talking to itself on loopback is fine; everything else goes to the black hole.
        NO_PROXY="127.0.0.1,localhost,::1",
        no_proxy="127.0.0.1,localhost,::1",
    )
    return env


def http_get(url: str, timeout: float = 5.0, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """GET without any proxy (the tests talk to loopback only); returns (status, body) for error statuses too."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with opener.open(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return "<no log>"
    return "\n".join(text.splitlines()[-lines:])


@dataclass
class WebuiServer:
    """One `python -m webui` process on a loopback port, with its data folder and logs."""

    root: Path
    data_dir: Path
    port: int
    extra_args: list[str]
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    ready_after_s: float = 0.0
    stdout_path: Path = field(init=False)
    stderr_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.stdout_path = self.root / "server.stdout.log"
        self.stderr_path = self.root / "server.stderr.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    @property
    def outputs_dir(self) -> Path:
        return self.data_dir / "outputs"

    @property
    def command(self) -> list[str]:
        return [sys.executable, "-m", "webui", "--data-dir", str(self.data_dir), "--port", str(self.port),
                *self.extra_args]

    def output_images(self) -> list[Path]:
        if not self.outputs_dir.exists():
            return []
        return sorted(p for p in self.outputs_dir.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))

    def start(self) -> WebuiServer:
        stdout = self.stdout_path.open("wb")
        stderr = self.stderr_path.open("wb")
        self.started_at = time.monotonic()
        self.process = subprocess.Popen(
            self.command, cwd=self.root, env=self.env, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL,
        )
        stdout.close()
        stderr.close()
        return self

    def wait_ready(self, timeout_s: float = SERVER_START_TIMEOUT_S) -> WebuiServer:
        assert self.process is not None
        deadline = time.monotonic() + timeout_s
        last_error = "no answer yet"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"webui exited with code {self.process.returncode} before serving {self.url}\n"
                    f"command: {self.command}\n{self.logs()}"
                )
            try:
                status, _ = http_get(self.url, timeout=2)
                if status == 200:
                    self.ready_after_s = time.monotonic() - self.started_at
                    return self
                last_error = f"HTTP {status}"
            except OSError as error:
                last_error = str(error)
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"webui did not answer 200 at {self.url} within {timeout_s:.0f} s ({last_error})\n{self.logs()}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=20)

    def logs(self) -> str:
        return (f"--- webui stdout (last {LOG_TAIL_LINES} lines) ---\n{tail(self.stdout_path)}\n"
                f"--- webui stderr (last {LOG_TAIL_LINES} lines) ---\n{tail(self.stderr_path)}")


def copy_checkpoints(source: Path, data_dir: Path) -> Path:
    """Copy every checkpoint and its `.config` sidecar from `source` into `data_dir/models/Stable-diffusion`."""
    target = data_dir / "models" / "Stable-diffusion"
    target.mkdir(parents=True, exist_ok=True)
    for entry in source.iterdir():
        if entry.is_dir():
            shutil.copytree(entry, target / entry.name)
        else:
            shutil.copy2(entry, target / entry.name)
    return target


@pytest.fixture(scope="session")
def ui_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ui")


@pytest.fixture(scope="session")
def server_blackhole(ui_tmp: Path) -> Iterator[BlackHole]:
    """Where the server processes' HTTP(S)_PROXY points; nothing may reach it."""
    with BlackHole("server", ui_tmp / "blackhole-server.log") as hole:
        yield hole


@pytest.fixture(scope="session")
def browser_blackhole(ui_tmp: Path) -> Iterator[BlackHole]:
    """Chromium's --proxy-server; only Chromium's own background services reach it (its pages are checked by routing)."""
    with BlackHole("chromium", ui_tmp / "blackhole-chromium.log") as hole:
        yield hole


@pytest.fixture(scope="session")
def page_leaks() -> list[str]:
    """Every non-loopback URL any test page tried to load (each was aborted)."""
    return []


@pytest.fixture(scope="session")
def start_webui(
    ui_tmp: Path, server_blackhole: BlackHole, request: pytest.FixtureRequest
) -> Iterator[Callable[..., WebuiServer]]:
    """Factory: `start_webui(name, models_from=dir_or_None, extra_args=[...])` → a ready WebuiServer, stopped at session end."""
    servers: list[WebuiServer] = []

    def start(name: str, models_from: Path | None, extra_args: list[str] | None = None) -> WebuiServer:
        root = ui_tmp / name
        root.mkdir()
        data_dir = root / "data"
        data_dir.mkdir()
        if models_from is not None:
            copy_checkpoints(models_from, data_dir)
        else:
            (data_dir / "models" / "Stable-diffusion").mkdir(parents=True)
        server = WebuiServer(root, data_dir, free_port(), list(extra_args or []), isolated_env(root, server_blackhole.url))
        servers.append(server)
        try:
            server.start().wait_ready()
        except RuntimeError as error:
            pytest.fail(str(error), pytrace=False)
        return server

    yield start
    failed = request.session.testsfailed > 0
    for server in servers:
        server.stop()
        if failed:
            print(f"\n[webui server {server.root.name} on port {server.port}]\n{server.logs()}", file=sys.stderr)


@pytest.fixture(scope="session")
def webui(start_webui: Callable[..., WebuiServer], tiny_model_dir: Path) -> WebuiServer:
    """THE server of the session: tiny.safetensors and tiny_b.safetensors in its models folder, no auth."""
    return start_webui("main", tiny_model_dir)


@pytest.fixture(scope="session", autouse=True)
def patient_expectations() -> None:
    """`expect(...)` waits DEFAULT_TIMEOUT_MS like every other Playwright wait; its own default (5 s) is shorter
    than a page load through the share tunnel on a loaded 2-core CI machine."""
    from playwright.sync_api import expect

    expect.set_options(timeout=DEFAULT_TIMEOUT_MS)


@pytest.fixture(scope="session")
def browser(ui_tmp: Path, browser_blackhole: BlackHole) -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: install it with `apt-get install -y chromium` (tools/run_tests.py does)",
                    pytrace=False)
    from playwright.sync_api import sync_playwright

    env = isolated_env(ui_tmp / "chromium-env", browser_blackhole.url)
    env["HOME"] = str(ui_tmp / "chromium-env" / "home")
    Path(env["HOME"]).mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            args=[*CHROMIUM_ARGS, f"--proxy-server={browser_blackhole.url}"],
            env=env,
        )
        yield launched
        launched.close()


@pytest.fixture
def new_context(browser: Any, page_leaks: list[str], request: pytest.FixtureRequest) -> Iterator[Callable[[], Any]]:
    """Factory for fresh browser contexts (own localStorage and cookies); off-loopback requests are aborted and recorded."""
    contexts: list[Any] = []

    def guard(route: Any) -> None:
        url = route.request.url
        if is_loopback_url(url):
            route.continue_()
        else:
            page_leaks.append(url)
            route.abort()

    def make() -> Any:
        context = browser.new_context(viewport=VIEWPORT)
        context.set_default_timeout(DEFAULT_TIMEOUT_MS)
        context.route("**/*", guard)
        contexts.append(context)
        return context

    yield make
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    for number, context in enumerate(contexts):
        if failed:
            for index, page in enumerate(context.pages):
                shot = Path(request.config.rootpath) / ".pytest_cache" / "ui-failures" / (
                    f"{request.node.name}-{number}-{index}.png")
                shot.parent.mkdir(parents=True, exist_ok=True)
                try:
                    page.screenshot(path=str(shot), full_page=True)
                    print(f"\nscreenshot of the failed page: {shot}", file=sys.stderr)
                    # CI keeps the log, not the screenshot: the page's words say what the user saw.
                    text = " ".join(page.inner_text("body", timeout=5_000).split())
                    print(f"text of the failed page: {text[:FAILED_PAGE_TEXT_CHARS]}", file=sys.stderr)
                except Exception as error:  # noqa: BLE001 - best effort diagnostics only
                    print(f"\n(no screenshot: {error})", file=sys.stderr)
        context.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    report = yield
    if report.when == "call":
        item.rep_call = report  # type: ignore[attr-defined]
    return report


@dataclass(frozen=True)
class EngineImages:
    """Images made by the headless engine CLI with known parameters (the values a user expects to see pasted back)."""

    gallery_png: Path
    jpeg: Path
    gallery_prompt: str
    jpeg_prompt: str
    negative_prompt: str
    settings: dict[str, str]


# Both prompts carry a comma and the gallery one a colon, so infotext quoting is exercised on the way back.
ENGINE_GALLERY_PROMPT = "a red lighthouse on a cliff, stormy sea, detail: high"
ENGINE_JPEG_PROMPT = "a green teapot on a wooden table, morning light"
ENGINE_NEGATIVE = "blurry, lowres"
# Every value differs from the txt2img defaults, so a control that is not filled shows up.
ENGINE_SETTINGS = {
    "steps": "7", "sampler": "DDIM", "scheduler": "Karras", "cfg_scale": "5.5", "seed": "1234",
    "width": "96", "height": "64", "clip_skip": "2",
}


def _start_engine_cli(data_dir: Path, prompt: str, extra: list[str], env_root: Path, proxy: str) -> subprocess.Popen[str]:
    settings = ENGINE_SETTINGS
    command = [
        sys.executable, "-m", "webui", "--data-dir", str(data_dir), "txt2img", "--ckpt", "tiny",
        "--prompt", prompt, "--negative-prompt", ENGINE_NEGATIVE, "--steps", settings["steps"],
        "--sampler", settings["sampler"], "--scheduler", settings["scheduler"], "--cfg-scale", settings["cfg_scale"],
        "--seed", settings["seed"], "--width", settings["width"], "--height", settings["height"],
        "--clip-skip", settings["clip_skip"], *extra,
    ]
    env_root.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(command, cwd=env_root, env=isolated_env(env_root, proxy), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="session")
def engine_images(webui: WebuiServer, tiny_model_dir: Path, ui_tmp: Path, server_blackhole: BlackHole) -> EngineImages:
    """Two images from `python -m webui txt2img`, made at the same time: a PNG in the running server's outputs
    folder (for the Gallery tab) and a JPEG in a data folder of its own (for PNG Info)."""
    jpeg_data = ui_tmp / "cli-jpeg-data"
    copy_checkpoints(tiny_model_dir, jpeg_data)
    jobs = {
        "gallery": _start_engine_cli(webui.data_dir, ENGINE_GALLERY_PROMPT, [], ui_tmp / "cli-gallery",
                                     server_blackhole.url),
        "jpeg": _start_engine_cli(jpeg_data, ENGINE_JPEG_PROMPT, ["--format", "jpg"], ui_tmp / "cli-jpeg",
                                  server_blackhole.url),
    }
    paths: dict[str, Path] = {}
    for name, job in jobs.items():
        stdout, stderr = job.communicate(timeout=SERVER_START_TIMEOUT_S)
        assert job.returncode == 0, f"engine CLI ({name}) exited with {job.returncode}:\n{stderr[-3000:]}"
        printed = [line for line in stdout.splitlines() if line.strip()]
        assert len(printed) == 1, f"engine CLI ({name}) printed {printed!r}"
        paths[name] = Path(printed[0])
        assert paths[name].is_file(), paths[name]
    assert paths["jpeg"].suffix == ".jpg", paths["jpeg"]
    return EngineImages(paths["gallery"], paths["jpeg"], ENGINE_GALLERY_PROMPT, ENGINE_JPEG_PROMPT, ENGINE_NEGATIVE,
                        dict(ENGINE_SETTINGS))


@pytest.fixture(scope="session")
def cli_env(ui_tmp: Path, server_blackhole: BlackHole) -> dict[str, str]:
    """Environment for short `python -m webui ...` runs: isolated folders, network through the black hole."""
    root = ui_tmp / "cli-runs"
    root.mkdir(exist_ok=True)
    return isolated_env(root, server_blackhole.url)
