"""Runs the whole test suite on a fresh machine: installs .venv (via launch.py), test extras and references, runs the
static checks (ruff, mypy; configured in pyproject.toml), then pytest. Standard library only (it runs before anything
is installed). Extra arguments go to pytest and skip the static checks (a targeted run)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import launch  # noqa: E402  (the launcher lives at the project root)

# Reference implementations the tests compare against. They are installed without their
# dependencies: both declare torchvision, which has no CPU build here and is never imported.
REFERENCE_PACKAGES = {"k-diffusion": "0.1.1.post1", "clip-anytorch": "2.6.0"}
# The browser tests drive Debian's Chromium through Playwright (never `playwright install`).
CHROMIUM = Path("/usr/bin/chromium")


def ensure_chromium() -> None:
    """Install Debian's chromium package when it is missing (CI runs as root on a fresh Debian machine)."""
    if CHROMIUM.exists():
        return
    apt_get = shutil.which("apt-get")
    if apt_get is None:
        raise SystemExit(f"[run_tests] {CHROMIUM} is missing and apt-get is not available: install chromium first")
    prefix = [] if os.geteuid() == 0 else ["sudo", "-n"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in ([*prefix, apt_get, "update"], [*prefix, apt_get, "install", "-y", "chromium"]):
        print(f"[run_tests] {' '.join(command)}", flush=True)
        if subprocess.run(command, env=env).returncode != 0:
            raise SystemExit(f"[run_tests] `{' '.join(command)}` failed; the browser tests need {CHROMIUM}")
    if not CHROMIUM.exists():
        raise SystemExit(f"[run_tests] chromium was installed but {CHROMIUM} is still missing")


# Each check's command after `python -m`; their settings (rules, checked folders) are in pyproject.toml.
STATIC_CHECKS = (("ruff", "check", "."), ("mypy",))


def run_static_checks(python: str) -> None:
    for check in STATIC_CHECKS:
        print(f"[run_tests] {' '.join(check)}", flush=True)
        if subprocess.run([python, "-m", *check], cwd=ROOT).returncode != 0:
            raise SystemExit(f"[run_tests] `{' '.join(check)}` found problems (listed above); pytest was not run")


def main(pytest_args: list[str]) -> int:
    launch.prepare_environment(extras=("test",))
    ensure_chromium()
    python = str(launch.venv_python())
    missing = [f"{name}=={version}" for name, version in REFERENCE_PACKAGES.items()
               if launch.installed_version(name) != version]
    if missing:
        launch.run(
            [python, "-m", "pip", "install", "--no-deps", "-c", str(launch.CONSTRAINTS_FILE), *missing],
            "installing test references",
        )
    if not pytest_args:
        run_static_checks(python)
    os.chdir(ROOT)
    os.execv(python, [python, "-m", "pytest", *(pytest_args or ["-q"])])
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
