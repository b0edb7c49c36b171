"""Runs the whole test suite on a fresh machine: installs .venv (via launch.py), test extras and references, then pytest.
Standard library only (it runs before anything is installed); extra arguments go to pytest."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import launch  # noqa: E402  (the launcher lives at the project root)

# Reference implementations the tests compare against. They are installed without their
# dependencies: both declare torchvision, which has no CPU build here and is never imported.
REFERENCE_PACKAGES = {"k-diffusion": "0.1.1.post1", "clip-anytorch": "2.6.0"}


def main(pytest_args: list[str]) -> int:
    launch.prepare_environment(extras=("test",))
    python = str(launch.venv_python())
    missing = [f"{name}=={version}" for name, version in REFERENCE_PACKAGES.items()
               if launch.installed_version(name) != version]
    if missing:
        launch.run(
            [python, "-m", "pip", "install", "--no-deps", "-c", str(launch.CONSTRAINTS_FILE), *missing],
            "installing test references",
        )
    os.chdir(ROOT)
    os.execv(python, [python, "-m", "pytest", *(pytest_args or ["-q"])])
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
