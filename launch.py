"""Installer and launcher: creates .venv, installs torch and the project into it, then starts the app.
Runs under any system Python 3.11+; must use the standard library only (nothing else is installed yet)."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV_DIR = ROOT / ".venv"
STAMP_FILE = VENV_DIR / "webui-install.json"
CONSTRAINTS_FILE = VENV_DIR / "webui-constraints.txt"
DEFAULT_TORCH_COMMAND = "pip install torch==2.13.0"
LAUNCHER_FLAGS = {"--exit", "--skip-install", "--reinstall-torch"}


def venv_python() -> Path:
    if os.name == "nt":
        return VENV_DIR / "Scripts" / "python.exe"
    return VENV_DIR / "bin" / "python"


def run(command: list[str], what: str) -> None:
    print(f"[launch] {what}: {shlex.join(command)}", flush=True)
    completed = subprocess.run(command, cwd=ROOT)
    if completed.returncode != 0:
        raise SystemExit(f"[launch] {what} failed (exit code {completed.returncode})")


def installed_version(package: str) -> str | None:
    """A package's version inside .venv, read from its metadata (no import of the package itself)."""
    probe = (
        "import importlib.metadata as m, sys\n"
        f"try: print(m.version({package!r}))\n"
        "except m.PackageNotFoundError: sys.exit(1)\n"
    )
    completed = subprocess.run([str(venv_python()), "-c", probe], capture_output=True, text=True)
    return completed.stdout.strip() if completed.returncode == 0 else None


def install_fingerprint(torch_command: str) -> str:
    """What an install depends on: the project's declared dependencies, the torch command, the Python.

    Only pyproject's [project] table counts: tool settings (ruff, mypy, pytest) change no install."""
    with open(ROOT / "pyproject.toml", "rb") as file:
        project = tomllib.load(file)["project"]
    digest = hashlib.sha256()
    digest.update(json.dumps(project, sort_keys=True).encode())
    digest.update(torch_command.encode())
    digest.update(sys.version.encode())
    return digest.hexdigest()


def read_stamp() -> dict[str, object]:
    try:
        return json.loads(STAMP_FILE.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def write_stamp(stamp: dict[str, object]) -> None:
    temporary = STAMP_FILE.with_suffix(".tmp")
    temporary.write_text(json.dumps(stamp, indent=2), encoding="utf-8")
    os.replace(temporary, STAMP_FILE)


def prepare_environment(extras: tuple[str, ...] = (), reinstall_torch: bool = False) -> None:
    """Make .venv hold torch and this project (with `extras`); a second call with nothing changed is instant."""
    torch_command = os.environ.get("TORCH_COMMAND", DEFAULT_TORCH_COMMAND)
    fingerprint = install_fingerprint(torch_command)
    stamp = read_stamp()
    installed_extras = set(stamp.get("extras", [])) if stamp.get("fingerprint") == fingerprint else set()
    if venv_python().exists() and not reinstall_torch and stamp.get("fingerprint") == fingerprint:
        if set(extras) <= installed_extras:
            return

    if not venv_python().exists():
        run([sys.executable, "-m", "venv", str(VENV_DIR)], "creating .venv")
    python = str(venv_python())
    if reinstall_torch or stamp.get("torch_command") != torch_command or installed_version("torch") is None:
        # TORCH_COMMAND is A1111's variable: a pip command line, e.g. with a CUDA index URL.
        words = shlex.split(torch_command)
        command = [python, "-m", *words] if words[0] == "pip" else words
        run(command, "installing torch")
    torch_version = installed_version("torch")
    if torch_version is None:
        raise SystemExit("[launch] torch is not installed in .venv after running TORCH_COMMAND")
    # Pin the torch just installed so no dependency can swap it for another (multi-GB) build.
    CONSTRAINTS_FILE.write_text(f"torch=={torch_version}\n", encoding="utf-8")
    wanted_extras = sorted(set(extras) | installed_extras)
    target = f"{ROOT}[{','.join(wanted_extras)}]" if wanted_extras else str(ROOT)
    run([python, "-m", "pip", "install", "-c", str(CONSTRAINTS_FILE), "-e", target], "installing webui")
    write_stamp(
        {"fingerprint": fingerprint, "torch_command": torch_command, "torch": torch_version, "extras": wanted_extras}
    )


def main(argv: list[str]) -> int:
    skip_install = "--skip-install" in argv
    if not skip_install:
        prepare_environment(reinstall_torch="--reinstall-torch" in argv)
    elif not venv_python().exists():
        raise SystemExit("[launch] --skip-install given but .venv does not exist yet")
    if "--exit" in argv:
        print("[launch] installed; exiting as asked (--exit)")
        return 0
    app_args = [arg for arg in argv if arg not in LAUNCHER_FLAGS]
    python = str(venv_python())
    os.execv(python, [python, "-m", "webui", *app_args])
    return 0  # not reached: execv replaces this process


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
