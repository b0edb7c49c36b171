"""The headless command line as a user runs it: `python -m webui txt2img ...` in a subprocess.
Checks stdout (paths only), files on disk with their infotext, errors, and that nothing reaches the network."""

from __future__ import annotations

import datetime
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from webui.app.outputs import read_infotext
from webui.core.files import sha256_of_file
from webui.core.infotext import parse_infotext

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--width", "64", "--height", "64", "--steps", "3"]

# Installed by each test that needs it: any connection attempt that is not to loopback fails and is
# written to a log, standing in for "no internet" (the edge this machine cannot reach anyway).
NETWORK_GUARD = '''
import os, socket
_real_connect = socket.socket.connect
def _guarded_connect(self, address):
    if self.family == socket.AF_UNIX:
        return _real_connect(self, address)
    host = str(address[0])
    if not (host.startswith("127.") or host in ("::1", "localhost")):
        with open(os.environ["NETWORK_ATTEMPTS_LOG"], "a") as log:
            log.write(repr(address) + "\\n")
        raise OSError("network blocked by the test")
    return _real_connect(self, address)
socket.socket.connect = _guarded_connect
'''


@pytest.fixture()
def data_dir(tmp_path: Path, tiny_model_dir: Path) -> Path:
    models = tmp_path / "data" / "models" / "Stable-diffusion"
    models.parent.mkdir(parents=True)
    shutil.copytree(tiny_model_dir, models)
    return tmp_path / "data"


def webui(*args: str, env: dict[str, str] | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "webui", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300
    )


def test_txt2img_prints_only_the_saved_paths(data_dir: Path) -> None:
    result = webui(
        "txt2img", "--data-dir", str(data_dir), "--ckpt", "tiny", "--prompt", "a cat, (hat:1.2)",
        "--negative-prompt", "blurry", "--seed", "42", "--batch-size", "2", *FAST,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    day = datetime.date.today().isoformat()
    assert lines == [
        str(data_dir / "outputs" / "txt2img-images" / day / "00000-42.png"),
        str(data_dir / "outputs" / "txt2img-images" / day / "00001-43.png"),
    ]
    for line, seed in zip(lines, (42, 43), strict=True):
        with Image.open(line) as image:
            assert image.size == (64, 64)
        fields = parse_infotext(read_infotext(Path(line)) or "")
        assert fields.prompt == "a cat, (hat:1.2)"
        assert fields.negative_prompt == "blurry"
        assert fields.fields["Seed"] == str(seed)
        assert fields.fields["Model"] == "tiny"


@pytest.mark.parametrize("image_format, suffix", [("jpg", ".jpg"), ("webp", ".webp")])
def test_jpeg_and_webp_carry_the_infotext(data_dir: Path, image_format: str, suffix: str) -> None:
    result = webui("txt2img", "--data-dir", str(data_dir), "--prompt", "a dog", "--seed", "5",
                   "--format", image_format, *FAST)
    assert result.returncode == 0, result.stderr
    path = Path(result.stdout.strip())
    assert path.suffix == suffix
    assert parse_infotext(read_infotext(path) or "").fields["Seed"] == "5"


def test_random_seed_is_reported(data_dir: Path) -> None:
    result = webui("txt2img", "--data-dir", str(data_dir), "--prompt", "x", "--seed", "-1", *FAST)
    assert result.returncode == 0, result.stderr
    path = Path(result.stdout.strip())
    seed = parse_infotext(read_infotext(path) or "").fields["Seed"]
    assert path.name.endswith(f"-{seed}.png") and int(seed) >= 0


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--steps", "0"], "steps: must be between 1 and 150, got 0"),
        (["--width", "65"], "width: must be a multiple of 8, got 65"),
        (["--cfg-scale", "31"], "cfg_scale: must be between 1 and 30"),
        (["--batch-size", "9"], "batch_size: must be between 1 and 8"),
        (["--sampler", "Nope"], "sampler: unknown sampler 'Nope'"),
        (["--scheduler", "Weird"], "scheduler: unknown schedule type 'Weird'"),
        (["--seed", "-2"], "seed: must be between -1 and 4294967295"),
        (["--steps", "many"], "argument --steps: invalid int value: 'many'"),
        (["--ckpt", "missing-model"], "checkpoint: no checkpoint matches 'missing-model'"),
    ],
)
def test_bad_input_names_the_field_and_limit(data_dir: Path, flags: list[str], message: str) -> None:
    result = webui("txt2img", "--data-dir", str(data_dir), "--prompt", "x", *flags)
    assert result.returncode != 0
    assert message in result.stderr
    assert result.stdout == ""


def test_pickle_checkpoint_is_refused_with_how_to_convert(data_dir: Path) -> None:
    pickle_file = data_dir / "models" / "Stable-diffusion" / "old.ckpt"
    pickle_file.write_bytes(b"PK\x03\x04 not loaded")
    for query in ("old.ckpt", str(pickle_file)):
        result = webui("txt2img", "--data-dir", str(data_dir), "--ckpt", query, "--prompt", "x", *FAST)
        assert result.returncode != 0
        assert "pickle" in result.stderr and "safetensors" in result.stderr and "save_file" in result.stderr


def test_checkpoint_by_path_file_name_and_short_hash(data_dir: Path) -> None:
    checkpoint = data_dir / "models" / "Stable-diffusion" / "tiny_b.safetensors"
    short_hash = sha256_of_file(checkpoint)[:10]
    for query in (str(checkpoint), "tiny_b.safetensors", "tiny_b", short_hash):
        result = webui("txt2img", "--data-dir", str(data_dir), "--ckpt", query, "--prompt", "x", *FAST)
        assert result.returncode == 0, (query, result.stderr)
        fields = parse_infotext(read_infotext(Path(result.stdout.strip())) or "").fields
        assert (fields["Model"], fields["Model hash"]) == ("tiny_b", short_hash)


def test_loading_never_reaches_for_the_hub(data_dir: Path, tmp_path: Path) -> None:
    guard_dir = tmp_path / "guard"
    guard_dir.mkdir()
    (guard_dir / "sitecustomize.py").write_text(NETWORK_GUARD)
    attempts = tmp_path / "attempts.log"
    env = {
        **os.environ,
        "PYTHONPATH": str(guard_dir),
        "NETWORK_ATTEMPTS_LOG": str(attempts),
        # Hub access switched on and pointed at the real hub address, so only our code can keep it off.
        "HF_HUB_OFFLINE": "0",
        "TRANSFORMERS_OFFLINE": "0",
        "HF_ENDPOINT": "https://huggingface.co",
    }
    result = webui("txt2img", "--data-dir", str(data_dir), "--prompt", "x", *FAST, env=env)
    assert result.returncode == 0, result.stderr
    assert not attempts.exists(), attempts.read_text()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_app_with_an_empty_model_folder_says_where_to_put_a_checkpoint(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "GRADIO_TEMP_DIR": str(tmp_path / "gradio"), "GRADIO_ANALYTICS_ENABLED": "False"}
    server = subprocess.Popen(
        [sys.executable, "-m", "webui", "--data-dir", str(tmp_path), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env,
    )
    try:
        seen: list[str] = []
        assert server.stdout is not None
        for line in server.stdout:
            seen.append(line)
            if f"127.0.0.1:{port}" in line:
                break
        output = "".join(seen)
        assert f"put a Stable Diffusion .safetensors checkpoint in {tmp_path / 'models' / 'Stable-diffusion'}" in output
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as response:
            assert response.status == 200
        assert server.poll() is None, output
    finally:
        server.terminate()
        server.wait(timeout=30)
    generate = webui("txt2img", "--data-dir", str(tmp_path), "--prompt", "x")
    assert generate.returncode != 0
    assert "no checkpoint found" in generate.stderr and "models/Stable-diffusion" in generate.stderr


def test_second_launch_with_nothing_changed_starts_at_once() -> None:
    """The test runner installed .venv through launch.py; running it again must skip every install step."""
    started = time.monotonic()
    result = subprocess.run([sys.executable, "launch.py", "--exit"], capture_output=True, text=True, cwd=ROOT)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert "installing" not in result.stdout
    assert "--exit" in result.stdout
    print(f"second launch: {elapsed:.2f} s")
