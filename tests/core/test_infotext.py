"""Tests of the A1111 infotext contract: quoting, writing, parsing and the GenerationParams mapping.
Must not import anything outside the standard library, pytest and webui.core."""

from __future__ import annotations

import pytest

from webui.core.infotext import (
    InfotextFields,
    build_infotext,
    format_infotext,
    generation_fields,
    params_from_infotext,
    parse_infotext,
    quote,
    unquote,
)
from webui.core.params import GenerationParams, ParamError
from webui.core.samplers import resolved_schedule_label

VERSION = "webui-0.1.0"

# The example infotexts of the A1111 spec (a.4), as A1111 1.10 / Forge write them.
SD15_LORA_EXAMPLE = (
    "masterpiece, best quality, 1girl, (smile:1.2), [blurry], <lora:add_detail:0.8>\n"
    "Negative prompt: lowres, bad anatomy, easynegative\n"
    "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234567890, Size: 512x768, "
    "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, VAE hash: 735e4c3a44, "
    "VAE: vae-ft-mse-840000-ema-pruned.safetensors, Clip skip: 2, "
    'Lora hashes: "add_detail: 7c6bad76eb54", TI hashes: "easynegative: c74b4e810b03", Version: v1.10.1'
)
SDXL_HIRES_EXAMPLE = (
    "a photo of a cat wearing a hat, studio lighting\n"
    "BREAK\n"
    "blue background\n"
    "Steps: 30, Sampler: Euler a, Schedule type: Automatic, CFG scale: 5.5, Seed: 42, Size: 1024x1024, "
    "Model hash: 31e35c80fc, Model: sd_xl_base_1.0, Denoising strength: 0.45, "
    'Hires prompt: "a photo of a cat, detailed fur", Hires upscale: 1.5, Hires steps: 15, '
    "Hires upscaler: R-ESRGAN 4x+, Version: v1.10.1"
)
VARIATION_EXAMPLE = (
    "(red:1.3) sports car on a mountain road\n"
    "Negative prompt: blurry\n"
    "Steps: 25, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 1000, Size: 768x512, "
    "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Variation seed: 2000, "
    "Variation seed strength: 0.3, ENSD: 31337, RNG: CPU, Emphasis: No norm, Version: v1.10.1"
)
FORGE_FLUX_EXAMPLE = (
    "a cat\n"
    "Steps: 20, Sampler: Euler, Schedule type: Simple, CFG scale: 1, Distilled CFG Scale: 3.5, Seed: 7, "
    "Size: 896x1152, Model hash: 275ef623d3, Model: flux1-dev-bnb-nf4-v2, "
    "Version: f2.0.1v1.10.1-previous-669-gdfdcbab6, Module 1: ae, Module 2: clip_l, Module 3: t5xxl_fp16"
)


def round_trip(params: GenerationParams, seed: int = 1234) -> GenerationParams:
    text = build_infotext(params, seed, params.checkpoint, "6ce0161689", VERSION)
    return GenerationParams(**params_from_infotext(parse_infotext(text)))  # type: ignore[arg-type]


def assert_same_generation(original: GenerationParams, restored: GenerationParams, seed: int = 1234) -> None:
    for name in ("prompt", "negative_prompt", "checkpoint", "sampler", "steps", "cfg_scale", "width", "height",
                 "clip_skip", "rng_source", "emphasis"):
        assert getattr(restored, name) == getattr(original, name), name
    assert restored.seed == seed
    # "Automatic" is written as the label it resolves to, so compare what the sampler will use.
    original_sampler, original_schedule = original.sampler_and_schedule()
    restored_sampler, restored_schedule = restored.sampler_and_schedule()
    assert restored_sampler == original_sampler
    assert resolved_schedule_label(restored_sampler, restored_schedule) == resolved_schedule_label(
        original_sampler, original_schedule
    )


# --- quote / unquote -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (20, "20"),
        (7.0, "7"),
        (7.5, "7.5"),
        (0.45, "0.45"),
        (True, "True"),
        ("DPM++ 2M", "DPM++ 2M"),
        ("R-ESRGAN 4x+", "R-ESRGAN 4x+"),
        ("a, b", '"a, b"'),
        ("add_detail: 7c6bad76eb54", '"add_detail: 7c6bad76eb54"'),
        ("two\nlines", '"two\\nlines"'),
        ('say "hi", ok', '"say \\"hi\\", ok"'),
        ("猫, 🐱", '"猫, 🐱"'),  # non-ASCII stays readable, as json.dumps(ensure_ascii=False)
        ("猫🐱", "猫🐱"),
    ],
)
def test_quote_matches_a1111(value: object, expected: str) -> None:
    assert quote(value) == expected


@pytest.mark.parametrize("value", ["", '"quoted"', " padded ", "back\\slash, x", "x: \"y\"\n\\z"])
def test_quote_then_unquote_restores_text_a1111_would_otherwise_alter(value: str) -> None:
    assert unquote(quote(value)) == value


@pytest.mark.parametrize("value", ["", '"quoted"', " padded ", "a, b: c\nd"])
def test_written_values_parse_back_unchanged(value: str) -> None:
    text = format_infotext("p", "", {"Steps": 20, "Hires prompt": value, "Seed": 1})
    assert parse_infotext(text).fields["Hires prompt"] == value


def test_unquote_leaves_unquoted_or_broken_text_alone() -> None:
    assert unquote("plain") == "plain"
    assert unquote('"broken') == '"broken'
    assert unquote('"bad \\escape"') == '"bad \\escape"'
    assert unquote('"') == '"'


# --- writer ----------------------------------------------------------------------------------------


def test_format_drops_none_writes_bare_keys_and_strips() -> None:
    text = format_infotext("  a cat  ", "", {"Steps": 20, "Model": None, "Tiling": "Tiling", "Seed": 5})
    assert text == "a cat  \nSteps: 20, Tiling, Seed: 5"


def test_format_writes_negative_line_only_when_not_empty() -> None:
    fields = {"Steps": 20, "Sampler": "Euler", "Seed": 1}
    assert format_infotext("p", "n", fields) == "p\nNegative prompt: n\nSteps: 20, Sampler: Euler, Seed: 1"
    assert format_infotext("p", "", fields) == "p\nSteps: 20, Sampler: Euler, Seed: 1"
    assert format_infotext("", "", fields) == "Steps: 20, Sampler: Euler, Seed: 1"


def test_generation_fields_in_a1111_order_with_all_optional_keys() -> None:
    params = GenerationParams(
        prompt="(cat)", negative_prompt="blurry", sampler="Euler a", steps=25, cfg_scale=6.5,
        width=768, height=512, clip_skip=2, rng_source="CPU", emphasis="No norm",
    )
    fields = generation_fields(params, 99, "v1-5-pruned-emaonly", "6ce0161689", VERSION)
    written = {key: value for key, value in fields.items() if value is not None}
    assert list(written) == [
        "Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Model hash", "Model",
        "Clip skip", "RNG", "Emphasis", "Version",
    ]
    assert build_infotext(params, 99, "v1-5-pruned-emaonly", "6ce0161689", VERSION) == (
        "(cat)\nNegative prompt: blurry\n"
        "Steps: 25, Sampler: Euler a, Schedule type: Automatic, CFG scale: 6.5, Seed: 99, Size: 768x512, "
        "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Clip skip: 2, RNG: CPU, Emphasis: No norm, "
        "Version: webui-0.1.0"
    )


def test_an_external_vae_is_written_where_a1111_writes_it_and_read_back() -> None:
    params = GenerationParams(prompt="a cat", clip_skip=2, vae="vae-ft-mse-840000-ema-pruned.safetensors")
    text = build_infotext(params, 1234567890, "v1-5-pruned-emaonly", "6ce0161689", VERSION,
                          vae_name="vae-ft-mse-840000-ema-pruned.safetensors", vae_hash="735e4c3a44")
    assert "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, VAE hash: 735e4c3a44, " \
        "VAE: vae-ft-mse-840000-ema-pruned.safetensors, Clip skip: 2, Version" in text
    assert params_from_infotext(parse_infotext(text))["vae"] == "vae-ft-mse-840000-ema-pruned.safetensors"
    # The checkpoint's own VAE is not named, as in A1111.
    assert "VAE" not in build_infotext(GenerationParams(prompt="a cat"), 1, "m", "6ce0161689", VERSION)


def test_default_params_write_what_a1111_writes() -> None:
    params = GenerationParams(prompt="a cat")
    text = build_infotext(params, 1234567890, "v1-5-pruned-emaonly", "6ce0161689", VERSION)
    assert text == (
        "a cat\n"
        "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234567890, Size: 512x512, "
        "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Version: webui-0.1.0"
    )


def test_missing_model_and_hash_are_left_out() -> None:
    text = build_infotext(GenerationParams(prompt="a cat"), 1, None, None, VERSION)
    assert "Model" not in text


@pytest.mark.parametrize(
    ("sampler", "scheduler", "label"),
    [
        ("DPM++ 2M", "Automatic", "Karras"),
        ("Euler a", "Automatic", "Automatic"),
        ("DPM++ 2M SDE", "Automatic", "Exponential"),
        ("DPM++ 2M", "Exponential", "Exponential"),
        ("DPM++ 2M Karras", "Automatic", "Karras"),  # old combined name
    ],
)
def test_schedule_type_is_the_resolved_label(sampler: str, scheduler: str, label: str) -> None:
    fields = generation_fields(GenerationParams(sampler=sampler, scheduler=scheduler), 1, None, None, VERSION)
    assert fields["Schedule type"] == label
    assert fields["Sampler"] == sampler.removesuffix(" Karras")


@pytest.mark.parametrize(("clip_skip", "written"), [(1, None), (2, "Clip skip: 2"), (12, "Clip skip: 12")])
def test_clip_skip_written_only_above_one(clip_skip: int, written: str | None) -> None:
    text = build_infotext(GenerationParams(clip_skip=clip_skip), 1, None, None, VERSION)
    assert ("Clip skip" in text) == (written is not None)
    if written:
        assert written in text


@pytest.mark.parametrize(("rng", "written"), [("GPU", False), ("CPU", True), ("NV", True)])
def test_rng_written_only_when_not_gpu(rng: str, written: bool) -> None:
    text = build_infotext(GenerationParams(rng_source=rng), 1, None, None, VERSION)
    assert (f"RNG: {rng}" in text) == written


@pytest.mark.parametrize(
    ("prompt", "negative", "emphasis", "written"),
    [
        ("(cat)", "", "No norm", True),
        ("cat", "[blurry]", "Ignore", True),
        ("cat", "blurry", "No norm", False),  # no brackets: the mode cannot matter
        ("(cat)", "", "Original", False),  # the default is never written
    ],
)
def test_emphasis_written_only_when_it_can_matter(
    prompt: str, negative: str, emphasis: str, written: bool
) -> None:
    params = GenerationParams(prompt=prompt, negative_prompt=negative, emphasis=emphasis)
    assert ("Emphasis:" in build_infotext(params, 1, None, None, VERSION)) == written


# --- parser: A1111's examples -----------------------------------------------------------------------


def test_parses_sd15_example_with_quoted_hashes() -> None:
    parsed = parse_infotext(SD15_LORA_EXAMPLE)
    assert parsed.prompt == "masterpiece, best quality, 1girl, (smile:1.2), [blurry], <lora:add_detail:0.8>"
    assert parsed.negative_prompt == "lowres, bad anatomy, easynegative"
    assert parsed.fields == {
        "Steps": "20", "Sampler": "DPM++ 2M", "Schedule type": "Karras", "CFG scale": "7",
        "Seed": "1234567890", "Size-1": "512", "Size-2": "768", "Model hash": "6ce0161689",
        "Model": "v1-5-pruned-emaonly", "VAE hash": "735e4c3a44",
        "VAE": "vae-ft-mse-840000-ema-pruned.safetensors", "Clip skip": "2",
        "Lora hashes": "add_detail: 7c6bad76eb54", "TI hashes": "easynegative: c74b4e810b03",
        "Version": "v1.10.1",
        # defaults A1111 injects: RNG always, Emphasis because the prompt uses weights
        "RNG": "GPU", "Emphasis": "Original",
    }


def test_parses_sdxl_hires_example_with_multiline_prompt_and_no_negative() -> None:
    parsed = parse_infotext(SDXL_HIRES_EXAMPLE)
    assert parsed.prompt == "a photo of a cat wearing a hat, studio lighting\nBREAK\nblue background"
    assert parsed.negative_prompt == ""
    assert parsed.fields == {
        "Steps": "30", "Sampler": "Euler a", "Schedule type": "Automatic", "CFG scale": "5.5", "Seed": "42",
        "Size-1": "1024", "Size-2": "1024", "Model hash": "31e35c80fc", "Model": "sd_xl_base_1.0",
        "Denoising strength": "0.45", "Hires prompt": "a photo of a cat, detailed fur", "Hires upscale": "1.5",
        "Hires steps": "15", "Hires upscaler": "R-ESRGAN 4x+", "Version": "v1.10.1",
        "Clip skip": "1", "RNG": "GPU",  # no Emphasis default: BREAK is not a weight
    }


def test_parses_variation_example_keeping_written_rng_and_emphasis() -> None:
    parsed = parse_infotext(VARIATION_EXAMPLE)
    assert parsed.prompt == "(red:1.3) sports car on a mountain road"
    assert parsed.negative_prompt == "blurry"
    assert parsed.fields == {
        "Steps": "25", "Sampler": "Euler a", "Schedule type": "Automatic", "CFG scale": "7", "Seed": "1000",
        "Size-1": "768", "Size-2": "512", "Model hash": "6ce0161689", "Model": "v1-5-pruned-emaonly",
        "Variation seed": "2000", "Variation seed strength": "0.3", "ENSD": "31337", "RNG": "CPU",
        "Emphasis": "No norm", "Version": "v1.10.1", "Clip skip": "1",
    }


def test_parses_forge_example() -> None:
    parsed = parse_infotext(FORGE_FLUX_EXAMPLE)
    assert parsed.prompt == "a cat"
    assert parsed.fields == {
        "Steps": "20", "Sampler": "Euler", "Schedule type": "Simple", "CFG scale": "1",
        "Distilled CFG Scale": "3.5", "Seed": "7", "Size-1": "896", "Size-2": "1152",
        "Model hash": "275ef623d3", "Model": "flux1-dev-bnb-nf4-v2",
        "Version": "f2.0.1v1.10.1-previous-669-gdfdcbab6", "Module 1": "ae", "Module 2": "clip_l",
        "Module 3": "t5xxl_fp16", "Clip skip": "1", "RNG": "GPU",
    }


def test_a1111_example_gives_generation_params() -> None:
    arguments = params_from_infotext(parse_infotext(SD15_LORA_EXAMPLE))
    assert arguments == {
        "prompt": "masterpiece, best quality, 1girl, (smile:1.2), [blurry], <lora:add_detail:0.8>",
        "negative_prompt": "lowres, bad anatomy, easynegative",
        "steps": 20, "sampler": "DPM++ 2M", "scheduler": "Karras", "cfg_scale": 7.0, "seed": 1234567890,
        "width": 512, "height": 768, "clip_skip": 2, "rng_source": "GPU", "emphasis": "Original",
        "checkpoint": "v1-5-pruned-emaonly", "vae": "vae-ft-mse-840000-ema-pruned.safetensors",
    }
    GenerationParams(**arguments).validated()  # type: ignore[arg-type]


# --- parser: A1111's rules --------------------------------------------------------------------------


def test_last_line_with_fewer_than_three_params_is_prompt_text() -> None:
    parsed = parse_infotext("a cat\nSteps: 20, Seed: 5")
    assert parsed.prompt == "a cat\nSteps: 20, Seed: 5"
    assert parsed.fields == {"Clip skip": "1", "RNG": "GPU", "Schedule type": "Automatic"}

    parsed = parse_infotext("a cat\nSteps: 20, Seed: 5, CFG scale: 7")
    assert parsed.prompt == "a cat"
    assert parsed.fields["Steps"] == "20"


def test_multiline_negative_prompt_takes_every_line_after_its_label() -> None:
    parsed = parse_infotext("pos one\npos two\nNegative prompt: neg one\nneg two\nSteps: 1, Seed: 2, CFG scale: 3")
    assert parsed.prompt == "pos one\npos two"
    assert parsed.negative_prompt == "neg one\nneg two"


def test_prompt_lines_are_stripped_like_a1111() -> None:
    parsed = parse_infotext("  indented  \n\n  Negative prompt:   spaced  \nSteps: 1, Seed: 2, CFG scale: 3")
    assert parsed.prompt == "indented\n"
    assert parsed.negative_prompt == "spaced"


def test_text_without_params_is_all_prompt() -> None:
    parsed = parse_infotext("just a prompt, nothing else")
    assert parsed.prompt == "just a prompt, nothing else"
    assert parsed.negative_prompt == ""


def test_empty_value_is_skipped_as_a1111_does() -> None:
    parsed = parse_infotext("p\nSteps: 20, Model: , Seed: 1, CFG scale: 7")
    assert "Model" not in parsed.fields
    assert parsed.fields["Seed"] == "1"


def test_size_like_values_are_split_for_any_key() -> None:
    parsed = parse_infotext("p\nSteps: 20, Hires resize: 1024x768, Seed: 1")
    assert parsed.fields["Hires resize-1"] == "1024"
    assert parsed.fields["Hires resize-2"] == "768"
    assert "Hires resize" not in parsed.fields


@pytest.mark.parametrize(
    ("prompt", "injected"),
    [
        ("(cat)", True),
        ("[cat]", True),
        ("(cat:0.8)", True),
        ("(cat:1.0)", False),  # explicit weight 1.0 is no emphasis
        ("\\(cat\\)", False),  # escaped brackets are literal text
        ("cat BREAK dog", False),
        ("plain, cat", False),
        ("unclosed (cat", True),
    ],
)
def test_emphasis_default_injected_only_for_weighted_prompts(prompt: str, injected: bool) -> None:
    parsed = parse_infotext(f"{prompt}\nSteps: 1, Seed: 2, CFG scale: 3")
    assert parsed.fields.get("Emphasis") == ("Original" if injected else None)


def test_written_defaults_are_not_overridden() -> None:
    parsed = parse_infotext("(cat)\nSteps: 1, Clip skip: 3, RNG: NV, Schedule type: Uniform, Emphasis: Ignore")
    assert parsed.fields["Clip skip"] == "3"
    assert parsed.fields["RNG"] == "NV"
    assert parsed.fields["Schedule type"] == "Uniform"
    assert parsed.fields["Emphasis"] == "Ignore"


# --- round trips -----------------------------------------------------------------------------------

ROUND_TRIP_PROMPTS = [
    "a cat",
    "first line\nsecond line\nthird line",
    'a "quoted" word, and more',
    "key: value, another: thing",
    "back\\slash \\(escaped\\) C:\\path\\to",
    "emoji 🐱🚀 and CJK 猫が好き 漢字, ünïcödé",
    "(masterpiece:1.2), [blurry], <lora:add_detail:0.8>, [cat:dog:0.5]",
    "Steps: 5, Sampler: Euler, CFG scale: 3\nstill the prompt",
    "a cat\nSteps: 5, Sampler: Euler, CFG scale: 3",
]


@pytest.mark.parametrize("prompt", ROUND_TRIP_PROMPTS)
def test_round_trip_prompt(prompt: str) -> None:
    params = GenerationParams(prompt=prompt, checkpoint="v1-5-pruned-emaonly").validated()
    assert_same_generation(params, round_trip(params))


@pytest.mark.parametrize(
    "negative",
    [
        "lowres, bad anatomy",
        "line one\nline two",
        'quotes " and \\ backslash, 猫 🐱',
        # A line that looks like a params line is safe inside the negative prompt: only the last line
        # of the infotext is read as parameters.
        "blurry\nSteps: 5, Sampler: Euler, Seed: 3, CFG scale: 2",
        "Steps: 5, Sampler: Euler, Seed: 3, CFG scale: 2",
    ],
)
def test_round_trip_negative_prompt(negative: str) -> None:
    params = GenerationParams(prompt="a cat\nwith a hat", negative_prompt=negative).validated()
    assert_same_generation(params, round_trip(params))


@pytest.mark.parametrize(
    "params",
    [
        GenerationParams(prompt="p", sampler="Euler a", steps=37, cfg_scale=6.5, width=768, height=1024),
        GenerationParams(prompt="p", sampler="DPM++ 2M", scheduler="Exponential", clip_skip=2, rng_source="CPU"),
        GenerationParams(prompt="(p)", negative_prompt="[n]", emphasis="No norm", rng_source="NV", clip_skip=12),
        GenerationParams(prompt="p", checkpoint="model, v2: final"),
        GenerationParams(prompt="p", checkpoint='"quoted" name'),
        GenerationParams(prompt="p", checkpoint="猫 model"),
        GenerationParams(prompt="", negative_prompt="only negative"),
        GenerationParams(prompt="", negative_prompt=""),
    ],
)
def test_round_trip_settings(params: GenerationParams) -> None:
    params.validated()
    assert_same_generation(params, round_trip(params, seed=4294967295), seed=4294967295)


def test_round_trip_without_model_leaves_checkpoint_unset() -> None:
    text = build_infotext(GenerationParams(prompt="p"), 1, None, None, VERSION)
    arguments = params_from_infotext(parse_infotext(text))
    assert "checkpoint" not in arguments


# --- params_from_infotext ----------------------------------------------------------------------------


def test_unknown_keys_are_ignored() -> None:
    arguments = params_from_infotext(
        InfotextFields("p", "", {"Steps": "20", "Hires upscaler": "R-ESRGAN 4x+", "ENSD": "31337"})
    )
    assert arguments == {"prompt": "p", "negative_prompt": "", "steps": 20}


def test_integral_float_text_is_accepted_for_integer_fields() -> None:
    # A1111 pastes integer fields through float().
    assert params_from_infotext(InfotextFields("p", "", {"Steps": "20.0"}))["steps"] == 20


@pytest.mark.parametrize(
    ("key", "value"),
    [("Steps", "twenty"), ("Steps", "20.5"), ("Seed", ""), ("Size-1", "wide"), ("CFG scale", "high"),
     ("CFG scale", "nan"), ("Clip skip", "inf")],
)
def test_bad_numbers_raise_param_error_naming_the_key(key: str, value: str) -> None:
    with pytest.raises(ParamError) as caught:
        params_from_infotext(InfotextFields("p", "", {key: value}))
    assert caught.value.field == key
    assert str(caught.value).startswith(f"{key}: ")


def test_version_value_is_passed_through() -> None:
    parsed = parse_infotext(build_infotext(GenerationParams(prompt="p"), 1, None, None, VERSION))
    assert parsed.fields["Version"] == "webui-0.1.0"
