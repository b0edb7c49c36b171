"""Tests for webui.engine.clip_tokenizer and tools/derive_clip_tokenizer.py against OpenAI's reference SimpleTokenizer.
Must not import gradio, fastapi or webui.app, nor `import clip`: the reference is loaded from clip-anytorch by path."""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from webui.engine.clip_tokenizer import TOKENIZER_DIR, ClipTokenizer, clean_prompt_text

REPO_ROOT = Path(__file__).resolve().parents[2]
DERIVE_SCRIPT = REPO_ROOT / "tools" / "derive_clip_tokenizer.py"
SHIPPED_FILES = ("vocab.json", "merges.txt", "LICENSE", "NOTICE.md")

LONG_PROMPT = (
    "masterpiece, best quality, ultra-detailed, 8k wallpaper, a breathtaking panoramic view of an ancient elven city "
    "carved into the side of a colossal waterfall at golden hour, intricate filigree bridges, glowing runes, "
    "lush hanging gardens, mist rising from the plunge pool, flocks of white birds, volumetric god rays, "
    "cinematic lighting, "
    "(dramatic clouds:1.3), ((vivid colors)), [lens flare], depth of field, bokeh, trending on artstation, by greg "
    "rutkowski and alphonse mucha, octane render, unreal engine 5, highly detailed matte painting, sharp focus, "
    "epic composition, 35mm photograph, film grain, award-winning photography, hyperrealistic, concept art, "
    "fantasy landscape, serene atmosphere, reflections on wet stone, moss-covered statues, lanterns, twilight sky"
)

PROMPTS = [
    "a photo of a cat",
    "A Photo Of A CAT sitting on a Mat",
    "(masterpiece:1.2), ((best)), [blurry]",
    "{extra} (nested (parens:1.1):0.9), [from:to:0.5], a|b, \\(escaped\\)",
    "<lora:abc:0.7> <hypernet:xyz:1> a portrait",
    "it's, don't, we're, they've, I'm, you'll, she'd, IT'S DON'T",
    "café naïve résumé Ångström crème brûlée jalapeño",
    "“curly double” and ‘curly single’ quotes",
    "salt &amp; pepper, a &lt; b, &quot;quoted&quot;, it&#39;s, &amp;amp; twice",
    "ＡＢＣ１２３ full width",
    "ﬁne ﬂowers ﬃ",
    "東京の夜景、美しい 风景 한국어",
    "a cute dog 🐶🔥✨ 👩‍👩‍👧 emoji",
    "Ελληνικά ΟΔΟΣ ΣΑΣ, Русский язык",
    "  lots   of\t\twhitespace \u3000 and\u00a0nbsp  ",
    "line one\nline two\r\nline three\n\n",
    "<|startoftext|>a cat<|endoftext|>",
    "<|STARTOFTEXT|> shouting special tokens <|EndOfText|>",
    "",
    "   \n\t ",
    "hello!! wow! ?!?",
    "123456 3.14 1,000,000 v2.1 sd_xl_base_1.0",
    "snake_case kebab-case CamelCase ALLCAPS",
    "<b>bold e&#769; html</b>",  # ftfy leaves HTML alone here, so html.unescape yields a bare combining accent
    "mojibake: Ã©tÃ© cafÃ©",
    LONG_PROMPT,
]


def load_module_from_path(module_name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    # dataclasses resolve string annotations through sys.modules, so the module must be registered while it runs.
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def clip_anytorch_file(relative_path: str) -> Path:
    try:
        distribution = importlib.metadata.distribution("clip-anytorch")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("clip-anytorch (the reference tokenizer) is not installed")
    return Path(str(distribution.locate_file(relative_path)))


@pytest.fixture(scope="module")
def reference_module() -> ModuleType:
    # `import clip` would fail (it needs torchvision and pkg_resources); the tokenizer file stands alone.
    return load_module_from_path("reference_simple_tokenizer", clip_anytorch_file("clip/simple_tokenizer.py"))


@pytest.fixture(scope="module")
def reference_tokenizer(reference_module: ModuleType) -> Any:
    return reference_module.SimpleTokenizer()


@pytest.fixture(scope="module")
def reference_bpe_gz() -> bytes:
    return clip_anytorch_file("clip/bpe_simple_vocab_16e6.txt.gz").read_bytes()


@pytest.fixture(scope="module")
def derive_module() -> ModuleType:
    return load_module_from_path("derive_clip_tokenizer", DERIVE_SCRIPT)


@pytest.fixture(scope="module")
def tokenizer() -> ClipTokenizer:
    return ClipTokenizer()


# (a) the shipped tables are the reference's tables


def test_shipped_files_exist() -> None:
    for file_name in SHIPPED_FILES:
        assert (TOKENIZER_DIR / file_name).is_file(), file_name


def test_vocab_json_equals_reference_encoder_in_id_order(reference_tokenizer: Any) -> None:
    pairs = json.loads((TOKENIZER_DIR / "vocab.json").read_text(encoding="utf-8"), object_pairs_hook=list)
    assert len(pairs) == 49408
    assert pairs == list(reference_tokenizer.encoder.items())
    assert [token_id for _, token_id in pairs] == list(range(49408))


def test_merges_txt_equals_reference_bpe_ranks(reference_tokenizer: Any) -> None:
    lines = (TOKENIZER_DIR / "merges.txt").read_text(encoding="utf-8").split("\n")
    assert lines[0] == "#version: 0.2"
    assert lines[-1] == ""
    merges = [tuple(line.split(" ")) for line in lines[1:-1]]
    assert len(merges) == 48894
    ranked_reference = sorted(reference_tokenizer.bpe_ranks.items(), key=lambda item: item[1])
    assert merges == [pair for pair, _ in ranked_reference]


def test_decode_token_matches_reference_decoder_for_every_id(
    tokenizer: ClipTokenizer, reference_tokenizer: Any
) -> None:
    assert tokenizer.vocab_size == len(reference_tokenizer.decoder) == 49408
    assert [tokenizer.decode_token(token_id) for token_id in range(49408)] == [
        reference_tokenizer.decoder[token_id] for token_id in range(49408)
    ]
    assert tokenizer.decode_token(2368) == "cat</w>"
    for out_of_range in (-1, 49408):
        with pytest.raises(ValueError):
            tokenizer.decode_token(out_of_range)


# (b) encode equals SimpleTokenizer.encode


@pytest.mark.parametrize("prompt", PROMPTS, ids=range(len(PROMPTS)))
def test_encode_matches_reference(tokenizer: ClipTokenizer, reference_tokenizer: Any, prompt: str) -> None:
    assert tokenizer.encode(prompt) == reference_tokenizer.encode(prompt)


@pytest.mark.parametrize("prompt", PROMPTS, ids=range(len(PROMPTS)))
def test_clean_prompt_text_matches_reference(reference_module: ModuleType, prompt: str) -> None:
    assert clean_prompt_text(prompt) == reference_module.whitespace_clean(reference_module.basic_clean(prompt))


def test_long_prompt_is_neither_truncated_nor_warned_about(
    tokenizer: ClipTokenizer,
    reference_tokenizer: Any,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    token_ids = tokenizer.encode(LONG_PROMPT)
    assert len(token_ids) > 150
    assert token_ids == reference_tokenizer.encode(LONG_PROMPT)
    captured = capfd.readouterr()
    for output in (caplog.text, captured.out, captured.err):
        assert "sequence length is longer than" not in output


def test_encode_many_equals_encode_one_by_one(tokenizer: ClipTokenizer) -> None:
    assert tokenizer.encode_many(PROMPTS) == [tokenizer.encode(prompt) for prompt in PROMPTS]
    assert tokenizer.encode_many([]) == []


def test_empty_and_blank_text_encode_to_nothing(tokenizer: ClipTokenizer) -> None:
    assert tokenizer.encode("") == []
    assert tokenizer.encode(" \n\t\u3000") == []


def test_whitespace_set_is_the_references(reference_module: ModuleType) -> None:
    # Every character either `re` or the reference's `regex` calls whitespace, between two letters.
    regex = pytest.importorskip("regex")
    candidates = [
        character
        for character in map(chr, range(0x3001))
        if character.isspace() or regex.match(r"\s", character)
    ]
    assert len(candidates) > 20
    for character in candidates:
        text = f"a{character}{character}b"
        expected = reference_module.whitespace_clean(reference_module.basic_clean(text))
        assert clean_prompt_text(text) == expected, hex(ord(character))


def test_special_token_glued_to_punctuation_is_split_out() -> None:
    # A known, deliberate difference: the reference's regex swallows "<|startoftext|>" into a preceding
    # punctuation run ("<<|" ...), while the tokenizers backend (like transformers' tokenizer that A1111 uses
    # for SD1) matches special tokens first. Pinned so a change in either direction is noticed.
    assert ClipTokenizer().encode("<<|startoftext|>") == [283, 49406]


# (c) special ids


def test_special_ids_for_sd1_padding(tokenizer: ClipTokenizer) -> None:
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (49406, 49407, 49407)
    assert tokenizer.comma_id == 267
    assert tokenizer.decode_token(tokenizer.comma_id) == ",</w>"
    assert tokenizer.vocab_size == 49408


def test_exclamation_padding_gives_id_zero_without_changing_encoding(
    tokenizer: ClipTokenizer, reference_tokenizer: Any
) -> None:
    exclamation_tokenizer = ClipTokenizer(pad_token="!")
    assert exclamation_tokenizer.pad_id == 0
    assert (exclamation_tokenizer.bos_id, exclamation_tokenizer.eos_id) == (49406, 49407)
    # "!" must stay an ordinary BPE symbol in prompts: "!!" is one token (748), a lone "!" is "!</w>" (256).
    prompt = "hello!! wow!"
    assert exclamation_tokenizer.encode(prompt) == tokenizer.encode(prompt) == reference_tokenizer.encode(prompt)
    assert 0 not in exclamation_tokenizer.encode(prompt)


def test_unknown_pad_token_is_rejected() -> None:
    with pytest.raises(ValueError):
        ClipTokenizer(pad_token="<|no such token|>")


# (d) no hub, no network

OFFLINE_CHILD = """
import socket, sys
attempts = []
def refuse(*args, **kwargs):
    attempts.append(args)
    raise OSError("network blocked by test")
socket.socket.connect = refuse
socket.socket.connect_ex = refuse
socket.create_connection = refuse
socket.getaddrinfo = refuse
from webui.engine.clip_tokenizer import ClipTokenizer
tokenizer = ClipTokenizer()
print(tokenizer.encode("a photo of a cat"), tokenizer.pad_id, ClipTokenizer(pad_token="!").pad_id)
print("network attempts:", len(attempts))
"""


@pytest.mark.parametrize("hub_offline", ["1", None], ids=["HF_HUB_OFFLINE=1", "hub-online-mode"])
def test_loads_with_the_hub_unreachable(tmp_path: Path, hub_offline: str | None) -> None:
    environment = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "TRANSFORMERS_"))}
    environment.update(
        {
            "PYTHONPATH": str(REPO_ROOT),
            # 10.255.255.1 is not routable: a real request would hang until its timeout, not fail fast.
            "HF_ENDPOINT": "http://10.255.255.1:9",
            "HF_HOME": str(tmp_path / "hf-home"),
        }
    )
    if hub_offline is not None:
        environment["HF_HUB_OFFLINE"] = hub_offline
    completed = subprocess.run(
        [sys.executable, "-c", OFFLINE_CHILD],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    assert "[320, 1125, 539, 320, 2368] 49407 0" in completed.stdout
    assert "network attempts: 0" in completed.stdout, completed.stdout + completed.stderr


# (e) the derivation reproduces the shipped files


def test_derivation_from_reference_gz_is_byte_identical(derive_module: ModuleType, reference_bpe_gz: bytes) -> None:
    assert hashlib.sha256(reference_bpe_gz).hexdigest() == derive_module.BPE_SHA256
    tables = derive_module.derive_tables(reference_bpe_gz)
    assert derive_module.render_vocab_json(tables) == (TOKENIZER_DIR / "vocab.json").read_bytes()
    assert derive_module.render_merges_txt(tables) == (TOKENIZER_DIR / "merges.txt").read_bytes()


def test_derive_script_regenerates_every_file_from_a_wheel(
    derive_module: ModuleType, reference_bpe_gz: bytes, tmp_path: Path
) -> None:
    # A stand-in for open_clip_torch's wheel: same BPE file (same sha256), same licence text, same metadata.
    wheel_path = tmp_path / "open_clip_torch-3.3.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel_path, "w") as wheel:
        wheel.writestr("open_clip/bpe_simple_vocab_16e6.txt.gz", reference_bpe_gz)
        metadata = "Metadata-Version: 2.4\nName: open_clip_torch\nVersion: 3.3.0\n"
        wheel.writestr("open_clip_torch-3.3.0.dist-info/METADATA", metadata)
        wheel.writestr("open_clip_torch-3.3.0.dist-info/licenses/LICENSE", (TOKENIZER_DIR / "LICENSE").read_bytes())
    output_dir = tmp_path / "out"

    assert derive_module.main(["--wheel", str(wheel_path), "--out", str(output_dir)]) == 0

    assert sorted(path.name for path in output_dir.iterdir()) == sorted(SHIPPED_FILES)
    for file_name in SHIPPED_FILES:
        assert (output_dir / file_name).read_bytes() == (TOKENIZER_DIR / file_name).read_bytes(), file_name


def test_derivation_rejects_a_different_bpe_file(derive_module: ModuleType, reference_bpe_gz: bytes) -> None:
    lines = gzip.decompress(reference_bpe_gz).split(b"\n")
    tampered = gzip.compress(b"\n".join([lines[0], lines[2], lines[1], *lines[3:]]), mtime=0)
    source = derive_module.WheelSource(package="open_clip_torch", version="3.3.0", bpe_gz=tampered, license_text="MIT")
    with pytest.raises(ValueError, match="sha256"):
        derive_module.render_outputs(source)
