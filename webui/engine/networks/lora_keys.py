"""LoRA/LyCORIS key names: a file's keys grouped per module (kohya, diffusers, PEFT layouts) and each module's name
resolved to one of our module paths "<component>.<path>". Must not import gradio, fastapi or webui.app.

Block and layer names come from diffusers' own LoRA converters (lora_conversion_utils, state_dict_utils); what
they do not cover (LDM resnet norms, norm_out, SD 1.x's up-level-0 upsampler slot) is the small table below.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

KOHYA = "kohya"
DIFFUSERS = "diffusers"
# The diffusers components a diffusers/PEFT-layout key can start with ("unet.down_blocks.0…lora_A.weight").
DIFFUSERS_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
UNET = "unet"
# LoRA files name text-encoder modules by transformers' CLIP paths with the `text_model` level
# (text_model.encoder.layers.0.mlp.fc1). transformers 5 builds CLIPTextModel without that level (its
# base_model_prefix), CLIPTextModelWithProjection with it: a name is tried as written, then without it.
TEXT_MODEL_LEVEL = "text_model"
# Every kohya text-encoder prefix any family uses: a network whose text-encoder prefixes are all foreign to the
# model's family is a network for another family (an SDXL LoRA's lora_te1_/lora_te2_ on an SD 1.x model).
KOHYA_TE_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_")
# How kohya-layout module names start (lora_unet_…, lora_te1_…; LyCORIS/OFT trainers' lycoris_…, oft_…). Other
# keys (a checkpoint dropped into the Lora folder) are skipped, so such a file reads as "no LoRA keys".
KOHYA_NAME_PREFIXES = ("lora_", "lycoris_", "oft_")
# A1111 1.10: textual-inversion embeddings bundled in a LoRA file ("bundle_emb.<name>.<key>").
BUNDLED_EMBEDDING_PREFIX = "bundle_emb."

# Weight parts (the key after the module name) every module type uses, in the names load_lora_file keeps.
# Diffusers/PEFT spellings are renamed to kohya's, as A1111 1.10 renames lora_A/lora_B.
WEIGHT_PART_RENAMES: Mapping[str, str] = {
    "lora_A.weight": "lora_down.weight",
    "lora_B.weight": "lora_up.weight",
    "lora.down.weight": "lora_down.weight",
    "lora.up.weight": "lora_up.weight",
    "lora_B.bias": "lora_up.bias",
    "lora_magnitude_vector.weight": "lora_magnitude_vector",
}
KNOWN_WEIGHT_PARTS = frozenset(
    {
        "lora_up.weight", "lora_down.weight", "lora_mid.weight", "lora_up.bias", "lora_magnitude_vector",
        "alpha", "scale", "dora_scale", "bias",
        "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
        "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
        "weight", "on_input", "diff", "diff_b", "w_norm", "b_norm",
        "a1.weight", "a2.weight", "b1.weight", "b2.weight", "oft_blocks", "oft_diag", "rescale",
        *WEIGHT_PART_RENAMES,
    }
)
# A diffusers-layout key's weight part: the longest known suffix wins ("lora_A.weight" over "weight").
_DIFFUSERS_PARTS_LONGEST_FIRST = sorted(KNOWN_WEIGHT_PARTS, key=len, reverse=True)

# LDM (sgm) UNet names, as SDXL kohya files (and some SD 1.x ones) spell them.
_LDM_UNET_NAME = re.compile(r"^(input_blocks|middle_block|output_blocks|time_embed|label_emb|out)_\d")
_SYNTHETIC_SUFFIX = ".lora_down.weight"
_KOHYA_UNET = "lora_unet_"
# What diffusers' converters leave in LDM spelling (_convert_unet_lora_key maps a resnet's conv1/conv2/
# time_emb_proj/conv_shortcut but not its norms, nor out.0), and SD 1.x's last output block of up level 0, which
# holds the upsampler in slot 1 (no transformer there) where _maybe_map_sgm_blocks_to_diffusers reads an attention.
# Applied to the dotted path diffusers' converters give.
_LDM_NAMES_DIFFUSERS_MISSES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\.resnets\.(\d+)\.in\.layers\.0$"), r".resnets.\1.norm1"),
    (re.compile(r"\.resnets\.(\d+)\.out\.layers\.0$"), r".resnets.\1.norm2"),
    (re.compile(r"^out\.0$"), "conv_norm_out"),
    (re.compile(r"^up_blocks\.(\d+)\.attentions\.\d+\.conv$"), r"up_blocks.\1.upsamplers.0.conv"),
)


@dataclass(frozen=True, slots=True)
class GroupedKeys:
    """A file's tensors grouped per module.

    `modules`: module name in the file → weight part → tensor; kohya names are the key up to its first "."
    ("lora_unet_down_blocks_0_…"), diffusers/PEFT names the dotted path ("unet.down_blocks.0.…to_q").
    `layouts`: module name → KOHYA or DIFFUSERS. `bundled_embeddings`: embedding name → key → tensor.
    `skipped`: keys that are none of these (A1111 skips keys it cannot place).
    """

    modules: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    layouts: dict[str, str] = field(default_factory=dict)
    bundled_embeddings: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)


def group_keys(tensors: Mapping[str, torch.Tensor]) -> GroupedKeys:
    """Group a LoRA file's keys per module (kohya: split at the first "." as A1111 does; diffusers/PEFT: the
    component-prefixed path before a known weight part, older diffusers spellings normalised to PEFT first)."""
    grouped = GroupedKeys()
    for key, tensor in tensors.items():
        if key.startswith(BUNDLED_EMBEDDING_PREFIX):
            name, _, part = key[len(BUNDLED_EMBEDDING_PREFIX):].partition(".")
            grouped.bundled_embeddings.setdefault(name, {})[part] = tensor
            continue
        component = key.split(".", 1)[0]
        if component in DIFFUSERS_COMPONENTS:
            split = _split_diffusers_key(component, key)
            layout = DIFFUSERS
        elif "." in key and key.startswith(KOHYA_NAME_PREFIXES):
            split = tuple(key.split(".", 1))  # type: ignore[assignment]
            layout = KOHYA
        else:
            split = None
            layout = KOHYA
        if split is None:
            grouped.skipped.append(key)
            continue
        module_name, part = split
        grouped.modules.setdefault(module_name, {})[WEIGHT_PART_RENAMES.get(part, part)] = tensor
        grouped.layouts[module_name] = layout
    return grouped


def _split_diffusers_key(component: str, key: str) -> tuple[str, str] | None:
    """(module path, weight part) of a diffusers/PEFT key, or None if it ends in no weight part we know."""
    normalised = _diffusers_key_as_peft(component, key)
    for part in _DIFFUSERS_PARTS_LONGEST_FIRST:
        if normalised.endswith("." + part):
            return normalised[: -len(part) - 1], part
    return None


def _diffusers_key_as_peft(component: str, key: str) -> str:
    """Older diffusers spellings (attention processors' to_q_lora, lora_linear_layer, lora.down) in PEFT's
    (…to_q.lora_A.weight), through diffusers' own converters."""
    from diffusers.utils.state_dict_utils import (
        StateDictType,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    probe: dict[str, None] = {key: None}
    if component == UNET:
        converted = convert_unet_state_dict_to_peft(probe)
    elif "_lora." in key:
        converted = convert_state_dict_to_peft(probe, original_type=StateDictType.DIFFUSERS_OLD)
    else:
        converted = convert_state_dict_to_peft(probe, original_type=StateDictType.DIFFUSERS)
    return next(iter(converted))


def _unet_layers_per_block(paths: Iterable[str]) -> int | None:
    """Resnets per down level of the UNet these module paths belong to (LDM block numbering depends on it)."""
    prefix = "unet.down_blocks.0.resnets."
    indices = {int(path[len(prefix):].split(".", 1)[0]) for path in paths if path.startswith(prefix)}
    return max(indices) + 1 if indices else None


class ModuleIndex:
    """The module paths of one loaded model, indexed the ways LoRA files name them.

    `paths`: "<component>.<path>" of every module that may be patched. kohya names are diffusers/transformers
    paths with "." → "_", so each component gets an underscore index; LDM names go through diffusers' converters.
    """

    def __init__(self, paths: Iterable[str]) -> None:
        self.paths = frozenset(paths)
        self._underscored: dict[str, dict[str, str]] = {}
        ambiguous: set[tuple[str, str]] = set()
        for path in self.paths:
            component, _, inner = path.partition(".")
            if not inner:
                continue
            table = self._underscored.setdefault(component, {})
            flat = inner.replace(".", "_")
            if flat in table and table[flat] != path:
                ambiguous.add((component, flat))
            table[flat] = path
        # Two paths that flatten to the same name cannot be told apart from a kohya key: match neither.
        for component, flat in ambiguous:
            del self._underscored[component][flat]
        self._layers_per_block = _unet_layers_per_block(self.paths)

    def __contains__(self, path: object) -> bool:
        return path in self.paths

    def kohya(self, component: str, name: str) -> str | None:
        """The path of a kohya module `name` (its family prefix removed) in `component`, or None.

        Both UNet spellings resolve for every family, as in A1111 (its regex maps diffusers-style names onto
        SDXL too, and its plain lora_unet → diffusion_model replace takes LDM names on SD 1.x): a diffusers name
        never looks like an LDM one, so trying the exact name first cannot pick a wrong module.
        """
        if component != UNET:
            table = self._underscored.get(component, {})
            found = table.get(name)
            if found is None and name.startswith(TEXT_MODEL_LEVEL + "_"):
                found = table.get(name[len(TEXT_MODEL_LEVEL) + 1:])
            return found
        direct = self._underscored.get(UNET, {}).get(name)
        if direct is not None:
            return direct
        if _LDM_UNET_NAME.match(name):
            return self._ldm_unet(name)
        return self._via_diffusers_converter(name)

    def _ldm_unet(self, name: str) -> str | None:
        """An LDM UNet name (input_blocks_4_1_…) through diffusers' SGM block renumbering, then its kohya →
        diffusers renames, then the few names those leave in LDM spelling."""
        from diffusers.loaders.lora_conversion_utils import _maybe_map_sgm_blocks_to_diffusers

        if self._layers_per_block is None:
            return None
        probe = {f"{_KOHYA_UNET}{name}{_SYNTHETIC_SUFFIX}": None}
        try:
            renumbered = next(iter(_maybe_map_sgm_blocks_to_diffusers(
                probe, SimpleNamespace(layers_per_block=self._layers_per_block)
            )))
        except (ValueError, IndexError, StopIteration):
            return None
        candidate = self._diffusers_candidate(renumbered[len(_KOHYA_UNET): -len(_SYNTHETIC_SUFFIX)])
        if candidate is None:
            return None
        if f"{UNET}.{candidate}" in self.paths:
            return f"{UNET}.{candidate}"
        for pattern, replacement in _LDM_NAMES_DIFFUSERS_MISSES:
            renamed = pattern.sub(replacement, candidate)
            if renamed != candidate and f"{UNET}.{renamed}" in self.paths:
                return f"{UNET}.{renamed}"
        return None

    def _via_diffusers_converter(self, name: str) -> str | None:
        candidate = self._diffusers_candidate(name)
        if candidate is None or f"{UNET}.{candidate}" not in self.paths:
            return None
        return f"{UNET}.{candidate}"

    @staticmethod
    def _diffusers_candidate(name: str) -> str | None:
        """diffusers' kohya → diffusers UNet renames (_convert_unet_lora_key, then its attention-processor names
        as PEFT module paths), read back as a dotted path inside the UNet; None if it gives no module path."""
        from diffusers.loaders.lora_conversion_utils import _convert_unet_lora_key
        from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

        converted = _convert_unet_lora_key(f"{_KOHYA_UNET}{name}{_SYNTHETIC_SUFFIX}")
        peft_key = next(iter(convert_unet_state_dict_to_peft({converted: None})))
        suffix = ".lora_A.weight"
        return peft_key[: -len(suffix)] if peft_key.endswith(suffix) else None

    def diffusers(self, name: str) -> str | None:
        """A diffusers/PEFT module name is already our path (text encoders: maybe without the `text_model`
        level); None if this model has no such module."""
        if name in self.paths:
            return name
        component, _, inner = name.partition(".")
        if component != UNET and inner.startswith(TEXT_MODEL_LEVEL + "."):
            shorter = f"{component}.{inner[len(TEXT_MODEL_LEVEL) + 1:]}"
            if shorter in self.paths:
                return shorter
        return None
