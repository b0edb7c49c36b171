"""Benchmark: seconds from starting the web UI (no model) until its page answers 200, against `import gradio` alone.
Standard library only; must not import webui or gradio itself (each measurement is a fresh interpreter); never a test."""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"
READY_TIMEOUT_S = 300.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def dead_proxy() -> str:
    """A loopback port nobody listens on: any attempt to leave the machine fails at once."""
    return f"http://127.0.0.1:{free_port()}"


def quiet_env(root: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("GRADIO_")}
    for name in ("GRADIO_TEMP_DIR", "HF_HOME", "TMPDIR", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "MPLCONFIGDIR"):
        folder = root / name.lower()
        folder.mkdir(parents=True, exist_ok=True)
        env[name] = str(folder)
    proxy = dead_proxy()
    env.update(GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", HTTP_PROXY=proxy, HTTPS_PROXY=proxy,
               http_proxy=proxy, https_proxy=proxy, NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    return env


def page_status(url: str) -> int | None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return None


def time_server_start(command_prefix: list[str], root: Path, run: int) -> float:
    """One cold start in a fresh, empty data folder; returns seconds until GET / answered 200."""
    data_dir = root / f"data-{run}"
    (data_dir / "models" / "Stable-diffusion").mkdir(parents=True)
    port = free_port()
    command = [*command_prefix, "--data-dir", str(data_dir), "--port", str(port)]
    log = (root / f"server-{run}.log").open("wb")
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, env=quiet_env(root / f"env-{run}"), stdout=log,
                               stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        while time.perf_counter() - started < READY_TIMEOUT_S:
            if process.poll() is not None:
                raise SystemExit(f"{command} exited with {process.returncode}; see {log.name}")
            if page_status(f"http://127.0.0.1:{port}/") == 200:
                return time.perf_counter() - started
            time.sleep(0.05)
        raise SystemExit(f"{command} did not answer within {READY_TIMEOUT_S:.0f} s; see {log.name}")
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def time_import_gradio(python: str, root: Path, run: int) -> float:
    started = time.perf_counter()
    subprocess.run([python, "-c", "import gradio"], cwd=ROOT, env=quiet_env(root / f"import-{run}"), check=True,
                   stdin=subprocess.DEVNULL)
    return time.perf_counter() - started


def row(label: str, samples: list[float]) -> str:
    return (f"{label:<48} {len(samples):>4} {statistics.median(samples):>9.2f} {min(samples):>8.2f} "
            f"{max(samples):>8.2f}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--launcher", choices=("module", "launch.py", "both"), default="both",
                        help="start with `.venv/bin/python -m webui`, `python launch.py --skip-install`, or both")
    args = parser.parse_args(argv)
    python = str(VENV_PYTHON if VENV_PYTHON.exists() else Path(sys.executable))
    starters = {
        "module": (".venv/bin/python -m webui", [python, "-m", "webui"]),
        "launch.py": ("python launch.py --skip-install", [sys.executable, str(ROOT / "launch.py"), "--skip-install"]),
    }
    chosen = list(starters) if args.launcher == "both" else [args.launcher]
    results: list[tuple[str, list[float]]] = []
    with tempfile.TemporaryDirectory(prefix="webui-startup-bench-") as temporary:
        root = Path(temporary)
        # Interleave the runs so a busy spell on the machine hits every row alike.
        samples: dict[str, list[float]] = {"import": [], **{name: [] for name in chosen}}
        for run in range(args.runs):
            samples["import"].append(time_import_gradio(python, root, run))
            for name in chosen:
                samples[name].append(time_server_start(starters[name][1], root / name, run))
            print(f"run {run + 1}/{args.runs}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in samples.items()),
                  file=sys.stderr, flush=True)
        results.append(("baseline: `import gradio` (fresh interpreter)", samples["import"]))
        for name in chosen:
            results.append((f"{starters[name][0]} → GET / 200", samples[name]))
    print(f"{'what (seconds, no model loaded)':<48} {'runs':>4} {'median':>9} {'min':>8} {'max':>8}")
    for label, values in results:
        print(row(label, values))
    baseline = statistics.median(samples["import"])
    for name in chosen:
        extra = statistics.median(samples[name]) - baseline
        print(f"{starters[name][0]}: {extra:+.2f} s over the `import gradio` baseline (medians)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
