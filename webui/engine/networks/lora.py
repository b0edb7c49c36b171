"""LoRA/LyCORIS .safetensors files as weight patches: loading and checking a file, routing its modules onto our
diffusers/transformers modules, and each module's ΔW as A1111 1.10 computes it. Must not import gradio, fastapi or
webui.app; never unpickles (only .safetensors load).

Key names: lora_keys (diffusers' converters). ΔW math of LoCon/LoCon-CP, LoHa, LoKr and DoRA: lycoris-lora's
`lycoris.functional`. Written here: module-type detection, scale/multiplier/dyn rules, IA³, full, norm, the
optional `bias` key, shape checks, and the DoRA convention choice.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

import torch

from webui.engine.networks.lora_keys import (
    DIFFUSERS,
    KOHYA,
    KOHYA_TE_PREFIXES,
    ModuleIndex,
    group_keys,
)
from webui.engine.patches import LowRank, ModuleDelta, PatchError

if TYPE_CHECKING:
    from webui.engine.families import Family

logger = logging.getLogger(__name__)

SAFETENSORS_SUFFIX = ".safetensors"
# diffusers' save_lora_weights stores the PEFT adapter config (r, lora_alpha, patterns) under this metadata key.
PEFT_ADAPTER_METADATA_KEY = "lora_adapter_metadata"
TEXT_ENCODER_COMPONENTS = ("text_encoder", "text_encoder_2")
# lycoris.functional picks triton/tilelang/torch.compile per call on CUDA; a merge is one op per module, where
# a compile warm-up costs more than the op, so the eager torch body runs everywhere.
LYCORIS_BACKEND = "torch"

# Module types, in A1111 1.10's order of trying them (network_lora, _hada, _ia3, _lokr, _full, _norm).
LORA = "LoRA"
LOHA = "LoHa"
IA3 = "IA3"
LOKR = "LoKr"
FULL = "full"
NORM = "norm"
_UNSUPPORTED_TYPES: tuple[tuple[str, frozenset[str]], ...] = (
    ("GLoRA", frozenset({"a1.weight", "a2.weight", "b1.weight", "b2.weight"})),
    ("OFT", frozenset({"oft_blocks"})),
    ("OFT", frozenset({"oft_diag"})),
)


class LoraError(PatchError, ValueError):
    """A LoRA file that cannot be used at all (found when it is read, before any patching); `label` names the
    file, `reason` says why."""


@dataclass(frozen=True, eq=False)
class LoraModule:
    """One module of a network file: `name` as the file spells it, `layout` KOHYA or DIFFUSERS, `kind` one of
    LORA/LOHA/IA3/LOKR/FULL/NORM, `tensors` weight part → tensor (CPU, the file's dtype; diffusers/PEFT parts
    renamed to kohya's). `alpha`/`scale`: from the file's keys, or for diffusers files from the PEFT adapter
    metadata (rsLoRA gives a `scale`)."""

    name: str
    layout: str
    kind: str
    tensors: Mapping[str, torch.Tensor]
    alpha: float | None = None
    scale: float | None = None

    def part(self, name: str) -> torch.Tensor | None:
        return self.tensors.get(name)

    @property
    def rank(self) -> int | None:
        """A1111's `dim`, the divisor of alpha: the rank of the factor it names per type."""
        t = self.tensors
        if self.kind == LORA:
            return int(t["lora_down.weight"].shape[0])
        if self.kind == LOHA:
            return int(t["hada_w1_b"].shape[0])
        if self.kind == LOKR:
            for part in ("lokr_w1_b", "lokr_w2_b"):
                if part in t:
                    return int(t[part].shape[0])
        return None

    @property
    def factor(self) -> float:
        """A1111's calc_scale: the `scale` key, else alpha/dim when both are known, else 1."""
        if self.scale is not None:
            return self.scale
        rank = self.rank
        if self.alpha is not None and rank:
            return self.alpha / rank
        return 1.0


@dataclass(frozen=True, eq=False)
class LoraNetwork:
    """A loaded LoRA/LyCORIS file: its modules (file name → LoraModule), `metadata` (the raw `__metadata__`
    strings), bundled textual-inversion tensors (embedding name → key → tensor) and the keys nothing reads.
    `mtime`/`size` are the file's when it was read (a patch's identity)."""

    path: Path
    mtime: float
    size: int
    modules: Mapping[str, LoraModule]
    metadata: Mapping[str, str]
    bundled_embeddings: Mapping[str, Mapping[str, torch.Tensor]]
    skipped_keys: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.path.name


def load_lora_file(path: Path | str) -> LoraNetwork:
    """Read a LoRA/LyCORIS `.safetensors` file into CPU tensors grouped per module, each of a known type.

    LoraError (naming the file) for another extension, an unreadable, corrupt or truncated file, a module
    whose keys are no type A1111 knows (A1111 refuses the whole file then), or a file with no LoRA keys at all.
    """
    path = Path(path)
    if path.suffix.lower() != SAFETENSORS_SUFFIX:
        kind = f"a {path.suffix} file" if path.suffix else "a file without extension"
        raise LoraError(path.name, f"{kind}: only .safetensors LoRA files load (others may run code when read)")
    try:
        stat = path.stat()
    except OSError as error:
        raise LoraError(path.name, f"cannot be read ({error.strerror or error})") from error
    metadata, tensors = _read_safetensors(path)
    grouped = group_keys(tensors)
    adapter_config = _peft_adapter_config(path.name, metadata)
    modules: dict[str, LoraModule] = {}
    for module_name, parts in grouped.modules.items():
        layout = grouped.layouts[module_name]
        kind = _module_kind(path.name, module_name, parts)
        alpha = _scalar(path.name, module_name, parts, "alpha")
        scale = _scalar(path.name, module_name, parts, "scale")
        module = LoraModule(module_name, layout, kind, MappingProxyType(parts), alpha, scale)
        if layout == DIFFUSERS and alpha is None and scale is None and adapter_config:
            module = _with_peft_alpha(module, adapter_config)
        modules[module_name] = module
    if not modules and not grouped.bundled_embeddings:
        sample = ", ".join(sorted(tensors)[:3]) or "none"
        raise LoraError(path.name, f"has no LoRA/LyCORIS keys (lora_unet_…, lora_te…, unet.…); its keys: {sample}")
    return LoraNetwork(
        path=path,
        mtime=stat.st_mtime,
        size=stat.st_size,
        modules=MappingProxyType(modules),
        metadata=MappingProxyType(dict(metadata)),
        bundled_embeddings=MappingProxyType(
            {name: MappingProxyType(parts) for name, parts in grouped.bundled_embeddings.items()}
        ),
        skipped_keys=tuple(grouped.skipped),
    )


def _read_safetensors(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise LoraError(path.name, f"is not a readable .safetensors file (corrupt or truncated?): {error}") from error
    return metadata, tensors


def _module_kind(file_name: str, module_name: str, parts: Mapping[str, torch.Tensor]) -> str:
    """The first A1111 1.10 module type whose required keys the module has; LoraError if none."""
    has = parts.__contains__
    if has("lora_up.weight") and has("lora_down.weight"):
        return LORA
    if all(has(p) for p in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")):
        return LOHA
    if has("weight") and has("on_input"):
        return IA3
    if (has("lokr_w1") or (has("lokr_w1_a") and has("lokr_w1_b"))) and (
        has("lokr_w2") or (has("lokr_w2_a") and has("lokr_w2_b"))
    ):
        return LOKR
    if has("diff"):
        return FULL
    if has("w_norm") and has("b_norm"):
        return NORM
    for type_name, required in _UNSUPPORTED_TYPES:
        if required <= parts.keys():
            raise LoraError(file_name, f"module {module_name} is a {type_name} module, which is not supported")
    raise LoraError(
        file_name,
        f"module {module_name} has keys {', '.join(sorted(parts))}, which are no LoRA/LyCORIS module type "
        "(LoRA, LoCon, LoHa, LoKr, IA3, full, norm)",
    )


def _scalar(file_name: str, module_name: str, parts: Mapping[str, torch.Tensor], part: str) -> float | None:
    tensor = parts.get(part)
    if tensor is None:
        return None
    if tensor.numel() != 1:
        raise LoraError(file_name, f"module {module_name}: {part} has shape {tuple(tensor.shape)}, not one number")
    return float(tensor.item())


def _peft_adapter_config(file_name: str, metadata: Mapping[str, str]) -> dict[str, object]:
    raw = metadata.get(PEFT_ADAPTER_METADATA_KEY)
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except json.JSONDecodeError:
        logger.warning(
            "%s: unreadable %s metadata; diffusers modules use scale 1", file_name, PEFT_ADAPTER_METADATA_KEY
        )
        return {}
    return config if isinstance(config, dict) else {}


def _with_peft_alpha(module: LoraModule, config: Mapping[str, object]) -> LoraModule:
    """A diffusers-saved PEFT module's alpha from its component's adapter config ("unet.lora_alpha", pattern
    overrides matched on the module path as PEFT matches them; rsLoRA divides by √rank instead of rank)."""
    component, _, inner = module.name.partition(".")
    alpha = config.get(f"{component}.lora_alpha")
    patterns = config.get(f"{component}.alpha_pattern")
    if isinstance(patterns, dict):
        for pattern, value in patterns.items():
            if re.match(rf"(.*\.)?({pattern})$", inner):
                alpha = value
                break
    if not isinstance(alpha, (int, float)) or module.kind != LORA:
        return module
    if config.get(f"{component}.use_rslora") and module.rank:
        return LoraModule(module.name, module.layout, module.kind, module.tensors, None, alpha / math.sqrt(module.rank))
    return LoraModule(module.name, module.layout, module.kind, module.tensors, float(alpha), None)


def model_modules(components: Mapping[str, torch.nn.Module]) -> dict[str, torch.nn.Module]:
    """Every submodule of the given components (component name → module) under its "<component>.<path>"."""
    return {
        f"{component}.{name}": module
        for component, root in components.items()
        for name, module in root.named_modules()
        if name
    }


class LoraPatch:
    """A network at given multipliers as a WeightPatch: ΔW per module of a model, routed by the family's prefixes.

    `te_multiplier` scales modules of the text encoders, `unet_multiplier` the UNet's (A1111's te/unet); `dyn`
    keeps only the first `dyn` ranks of plain LoRA modules (A1111's dyn_dim). A component at multiplier 0 gets
    no deltas at all, so the model stays bit for bit unpatched there.
    """

    def __init__(
        self,
        network: LoraNetwork,
        family: Family,
        te_multiplier: float,
        unet_multiplier: float,
        dyn: int | None = None,
    ) -> None:
        self.network = network
        self.family = family
        self.te_multiplier = float(te_multiplier)
        self.unet_multiplier = float(unet_multiplier)
        self.dyn = dyn
        # Longest first, so no prefix shadows a longer one that starts with it.
        self._prefixes = sorted(family.lora_prefixes.items(), key=lambda item: len(item[0]), reverse=True)

    @property
    def key(self) -> tuple[str, float, int, float, float, int | None]:
        return (
            str(self.network.path), self.network.mtime, self.network.size,
            self.te_multiplier, self.unet_multiplier, self.dyn,
        )

    @property
    def label(self) -> str:
        return self.network.name

    def __repr__(self) -> str:
        return f"<LoraPatch {self.label} te={self.te_multiplier} unet={self.unet_multiplier} dyn={self.dyn}>"

    def multiplier(self, path: str) -> float:
        """The multiplier of the module at `path`: te for the text encoders, unet for everything else."""
        return self.te_multiplier if path.split(".", 1)[0] in TEXT_ENCODER_COMPONENTS else self.unet_multiplier

    def module_paths(self, modules: Mapping[str, torch.nn.Module] | ModuleIndex) -> dict[str, str | None]:
        """File module name → the path of the model module it patches, or None where this model has none.

        All None when the network's text-encoder prefixes (kohya) or components (diffusers) are ones this
        model's family does not have: an SDXL LoRA on an SD 1.x model, or the other way round.
        """
        index = modules if isinstance(modules, ModuleIndex) else ModuleIndex(modules.keys())
        foreign = self._for_another_family(index)
        return {
            name: None if foreign else self._resolve(index, module) for name, module in self.network.modules.items()
        }

    def targets(self, modules: Mapping[str, torch.nn.Module] | ModuleIndex) -> dict[str, LoraModule]:
        """Model module path → the network module that patches it, for the modules of this model it names."""
        matched: dict[str, LoraModule] = {}
        for name, path in self.module_paths(modules).items():
            if path is not None:
                # A1111 keys a network's modules by model module: a later file module for the same one wins.
                matched[path] = self.network.modules[name]
        return matched

    def matched_modules(self, modules: Mapping[str, torch.nn.Module] | ModuleIndex) -> int:
        """How many of the network's modules name a module of this model (0: the network does not fit it)."""
        return len(self.targets(modules))

    def _for_another_family(self, index: ModuleIndex) -> bool:
        components = {path.split(".", 1)[0] for path in index.paths}
        for module in self.network.modules.values():
            if module.layout == KOHYA:
                te_prefix = next((p for p in KOHYA_TE_PREFIXES if module.name.startswith(p)), None)
                if te_prefix is not None and te_prefix not in self.family.lora_prefixes:
                    return True
            elif module.name.split(".", 1)[0] not in components:
                return True
        return False

    def _resolve(self, index: ModuleIndex, module: LoraModule) -> str | None:
        if module.layout == DIFFUSERS:
            return index.diffusers(module.name)
        for prefix, component in self._prefixes:
            if module.name.startswith(prefix):
                return index.kohya(component, module.name[len(prefix):])
        return None

    def deltas(self, modules: Mapping[str, torch.nn.Module]) -> Mapping[str, ModuleDelta]:
        """Module path → ModuleDelta for every module of `modules` the network patches at a non-zero multiplier.

        Every target's shapes are checked first: PatchError (naming the file) if any does not fit. The deltas are
        computed when read (float32 on the module's device, returned in its weight's dtype) and not kept, so a
        large network never holds all its ΔW at once; IA³ and DoRA deltas use the module's weight at that moment.
        A delta may carry a bias (full `diff_b`, norm `b_norm`) for a module that has none: the caller adds one.
        """
        targets = {
            path: module for path, module in self.targets(modules).items() if self.multiplier(path) != 0.0
        }
        misfits = []
        for path, module in targets.items():
            reason = misfit(module, modules[path])
            if reason is not None:
                misfits.append(f"{path} (file module {module.name}): {reason}")
        if misfits:
            raise PatchError(
                self.label,
                f"{len(misfits)} of its {len(targets)} modules do not fit this model (a network for another model "
                f"family?), e.g. {misfits[0]}",
            )
        return _LazyDeltas(self, modules, targets)

    def merge_deltas(self, modules: Mapping[str, torch.nn.Module]) -> Mapping[str, ModuleDelta]:
        """`deltas` as the patch layer merges them: a plain LoRA module's ΔW comes as its factors (ModuleDelta
        .low_rank, see low_rank_delta), which the merge folds into one GEMM; every other module as in `deltas`."""
        checked = self.deltas(modules)
        assert isinstance(checked, _LazyDeltas)
        return _LazyDeltas(self, modules, checked.targets, low_rank=True)

    def delta(self, path: str, module: LoraModule, target: torch.nn.Module, low_rank: bool = False) -> ModuleDelta:
        """The ΔW (and bias delta) `module` adds to `target` at this patch's multiplier and dyn; as factors where
        `low_rank` and the module is a plain LoRA one."""
        try:
            factors = low_rank_delta(module, target, self.multiplier(path), self.dyn) if low_rank else None
            if factors is not None:
                return ModuleDelta(low_rank=factors)
            weight_delta, bias_delta = module_delta(module, target, self.multiplier(path), self.dyn)
        except (RuntimeError, ValueError) as error:
            raise PatchError(self.label, f"{path} (file module {module.name}): {error}") from error
        return ModuleDelta(weight_delta, bias_delta)


class _LazyDeltas(Mapping[str, ModuleDelta]):
    """The deltas of one patch on one model, each computed when it is read (see LoraPatch.deltas)."""

    def __init__(
        self, patch: LoraPatch, modules: Mapping[str, torch.nn.Module], targets: Mapping[str, LoraModule],
        low_rank: bool = False,
    ) -> None:
        self._patch = patch
        self._modules = modules
        self._targets = targets
        self._low_rank = low_rank

    @property
    def targets(self) -> Mapping[str, LoraModule]:
        return self._targets

    def __getitem__(self, path: str) -> ModuleDelta:
        return self._patch.delta(path, self._targets[path], self._modules[path], self._low_rank)

    def __iter__(self) -> Iterator[str]:
        return iter(self._targets)

    def __len__(self) -> int:
        return len(self._targets)


# A plain LoRA module: these parts only (no mid, DoRA, bias key or extra bias), ΔW = up @ down · factor · multiplier.
_PLAIN_LORA_PARTS = frozenset({"lora_up.weight", "lora_down.weight", "alpha", "scale"})


def low_rank_delta(
    module: LoraModule, target: torch.nn.Module, multiplier: float, dyn: int | None = None
) -> LowRank | None:
    """A plain LoRA module's ΔW as factors for the merge: module_delta's LoRA case (up[:, :dyn] @ down[:dyn], times
    alpha/dim and the multiplier) left unmultiplied. None where module_delta must build ΔW: other types, a mid,
    DoRA or bias parts, an up that is no matrix, a conv_in ΔW padded for an inpainting UNet."""
    if module.kind != LORA or not module.tensors.keys() <= _PLAIN_LORA_PARTS:
        return None
    weight = target.weight
    assert isinstance(weight, torch.Tensor)
    up, down = module.tensors["lora_up.weight"], module.tensors["lora_down.weight"]
    if up.dim() < 2 or any(size != 1 for size in up.shape[2:]) or up.shape[1] != down.shape[0]:
        return None
    up, down = up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1)
    if dyn is not None:
        up, down = up[:, :dyn], down[:dyn]
    if up.shape[0] != weight.shape[0] or up.shape[0] * down.shape[1] != weight.numel():
        return None
    return LowRank(_f32(up, weight.device), _f32(down, weight.device), module.factor * multiplier)


# ---------------------------------------------------------------------------------------------------- shapes


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def _rebuilt_shape(module: LoraModule) -> tuple[int, ...]:
    """The shape of the module's ΔW as its factors give it, before it is reshaped onto the target weight."""
    t = module.tensors
    if module.kind == LORA:
        up, down, mid = t["lora_up.weight"], t["lora_down.weight"], t.get("lora_mid.weight")
        if up.shape[1] != down.shape[0]:
            raise ValueError(f"lora_up has rank {up.shape[1]} but lora_down rank {down.shape[0]}")
        if mid is not None:
            return (int(up.shape[0]), int(down.shape[1]), *mid.shape[2:])
        return (int(up.shape[0]), *down.shape[1:])
    if module.kind == LOHA:
        halves = []
        for a, b, tucker in (("hada_w1_a", "hada_w1_b", "hada_t1"), ("hada_w2_a", "hada_w2_b", "hada_t2")):
            wa, wb, core = t[a], t[b], t.get(tucker)
            if core is not None:
                halves.append((int(wa.shape[1]), int(wb.shape[1]), *core.shape[2:]))
            elif wa.shape[1] != wb.shape[0]:
                raise ValueError(f"{a} has rank {wa.shape[1]} but {b} rank {wb.shape[0]}")
            else:
                halves.append((int(wa.shape[0]), *wb.shape[1:]))
        if _numel(halves[0]) != _numel(halves[1]):
            raise ValueError(f"its two Hadamard factors have shapes {halves[0]} and {halves[1]}")
        return halves[0]
    if module.kind == LOKR:
        w1 = t.get("lokr_w1")
        first = tuple(w1.shape) if w1 is not None else (int(t["lokr_w1_a"].shape[0]), int(t["lokr_w1_b"].shape[1]))
        w2, core = t.get("lokr_w2"), t.get("lokr_t2")
        if w2 is not None:
            second = tuple(w2.shape)
        elif core is not None:
            second = (int(t["lokr_w2_a"].shape[1]), int(t["lokr_w2_b"].shape[1]), *core.shape[2:])
        else:
            second = (int(t["lokr_w2_a"].shape[0]), *t["lokr_w2_b"].shape[1:])
        return (first[0] * second[0], first[1] * second[1], *second[2:])
    if module.kind == FULL:
        return tuple(t["diff"].shape)
    if module.kind == NORM:
        return tuple(t["w_norm"].shape)
    raise AssertionError(f"no rebuilt shape for {module.kind}")


def _is_inpaint_conv_in(shape: tuple[int, ...], weight_shape: tuple[int, ...]) -> bool:
    """A1111: a ΔW for a 4-channel conv_in applies to a 9-channel inpainting UNet, zero-padded."""
    return (
        len(shape) == 4 and len(weight_shape) == 4 and shape[1] == 4 and weight_shape[1] == 9
        and shape[0] == weight_shape[0] and shape[2:] == weight_shape[2:]
    )


def _dora_per_output(dora: torch.Tensor, part: str, weight_shape: tuple[int, ...]) -> bool:
    """Which norm a DoRA magnitude goes with: per input channel (A1111 1.10 and kohya-style `dora_scale` of shape
    (1, in[, 1, 1])) or per output row (LyCORIS' default (out, 1[, 1, 1]) and PEFT's `lora_magnitude_vector`).
    A1111 always normalises per input channel, which for (out, 1) magnitudes broadcasts into nonsense; reading the
    convention off the shape gives what the trainer meant. ValueError if the shape is neither."""
    out_dim = weight_shape[0]
    in_dim = weight_shape[1] if len(weight_shape) > 1 else 1
    shape = tuple(dora.shape)
    if part == "lora_magnitude_vector" and dora.numel() == out_dim:
        return True
    if len(shape) >= 2 and shape[0] == 1 and shape[1] == in_dim and dora.numel() == in_dim:
        return False
    if len(shape) == 1 and shape[0] == in_dim:
        return False
    if shape and shape[0] == out_dim and dora.numel() == out_dim:
        return True
    raise ValueError(f"its {part} has shape {shape}, which fits neither the inputs nor the outputs of {weight_shape}")


def misfit(module: LoraModule, target: torch.nn.Module) -> str | None:
    """Why `module` cannot patch `target` (shapes, a module without a weight), or None if it can."""
    weight = getattr(target, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return f"{type(target).__name__} has no weight to patch"
    weight_shape = tuple(weight.shape)
    t = module.tensors
    try:
        if module.kind == IA3:
            vector = t["weight"]
            axis = 1 if bool(t["on_input"].item()) else 0
            if len(weight_shape) <= axis or vector.numel() != weight_shape[axis]:
                return f"IA3 weight has {vector.numel()} values, the module's weight has shape {weight_shape}"
            shape = weight_shape
        else:
            shape = _rebuilt_shape(module)
            fits = _numel(shape) == weight.numel() and shape[0] == weight_shape[0]
            if not fits and not _is_inpaint_conv_in(shape, weight_shape):
                return f"the file gives a {_describe(shape)} weight, the model's is {_describe(weight_shape)}"
        extra = t.get("bias")
        if extra is not None and extra.numel() != _numel(shape):
            return f"its bias key has {extra.numel()} values for a {_describe(shape)} weight"
        for part in ("diff_b", "b_norm", "lora_up.bias"):
            bias = t.get(part)
            if bias is not None and bias.numel() != weight_shape[0]:
                return f"its {part} has {bias.numel()} values for {weight_shape[0]} outputs"
        for part in ("dora_scale", "lora_magnitude_vector"):
            dora = t.get(part)
            if dora is not None:
                _dora_per_output(dora, part, weight_shape)
    except ValueError as error:
        return str(error)
    return None


def _describe(shape: tuple[int, ...]) -> str:
    return "×".join(str(size) for size in shape) or "scalar"


# ---------------------------------------------------------------------------------------------------- ΔW


def module_delta(
    module: LoraModule, target: torch.nn.Module, multiplier: float, dyn: int | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(ΔW, bias delta or None) of `module` on `target`, in the target's dtypes, as A1111 1.10's finalize_updown:
    ΔW₁ = (ΔW + bias key)·scale; with a DoRA magnitude ΔW₁ = DoRA(W, ΔW₁); result ΔW₁·multiplier. Extra bias
    terms (diff_b, b_norm) are multiplied by the multiplier only. Computed in float32 on the weight's device."""
    weight = target.weight
    assert isinstance(weight, torch.Tensor)
    device = weight.device
    rebuilt = _rebuild(module, weight, device, dyn)
    extra = module.part("bias")
    if extra is not None:
        rebuilt = rebuilt + _f32(extra, device).reshape(rebuilt.shape)
    delta = _onto(rebuilt, tuple(weight.shape))
    factor = module.factor
    dora_part = "dora_scale" if "dora_scale" in module.tensors else "lora_magnitude_vector"
    dora = module.part(dora_part)
    if dora is not None:
        if factor != 1.0:
            delta = delta * factor
        per_output = _dora_per_output(dora, dora_part, tuple(weight.shape))
        delta = _dora(delta, _f32(weight.detach(), device), _f32(dora, device), per_output)
        factor = 1.0
    if factor * multiplier != 1.0:
        delta = delta * (factor * multiplier)
    bias_delta = _bias_delta(module, target, device, multiplier)
    return delta.to(weight.dtype), bias_delta


def _f32(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    return tensor.to(device=device, dtype=torch.float32)


def _rebuild(module: LoraModule, weight: torch.Tensor, device: torch.device, dyn: int | None) -> torch.Tensor:
    """The module's ΔW from its factors (no scale, no multiplier), in the shape the factors give; `weight` (the
    target's) is read by IA³ only."""
    from lycoris.functional import locon, loha, lokr, tucker_weight

    def part(name: str) -> torch.Tensor | None:
        tensor = module.part(name)
        return None if tensor is None else _f32(tensor, device)

    if module.kind == LORA:
        up, down, mid = part("lora_up.weight"), part("lora_down.weight"), part("lora_mid.weight")
        assert up is not None and down is not None
        if mid is None and dyn is not None:
            # A1111 rebuild_conventional: up[:, :dyn] @ down[:dyn] (CP modules ignore dyn there too).
            up, down = up.reshape(up.shape[0], -1)[:, :dyn], down[:dyn]
        return locon.diff_weight(down, up, mid, gamma=1.0, backend=LYCORIS_BACKEND)
    if module.kind == LOHA:
        w1a, w1b, w2a, w2b = part("hada_w1_a"), part("hada_w1_b"), part("hada_w2_a"), part("hada_w2_b")
        t1, t2 = part("hada_t1"), part("hada_t2")
        assert w1a is not None and w1b is not None and w2a is not None and w2b is not None
        if (t1 is None) == (t2 is None):
            # LyCORIS' argument order: (w1_b, w1_a, w2_b, w2_a, t1, t2).
            return loha.diff_weight(w1b, w1a, w2b, w2a, t1, t2, gamma=1.0, backend=LYCORIS_BACKEND)
        # One Tucker half only (A1111 accepts it; lycoris' diff_weight wants both or neither).
        first = tucker_weight(w1a, w1b, t1) if t1 is not None else _conventional(w1a, w1b)
        second = tucker_weight(w2a, w2b, t2) if t2 is not None else _conventional(w2a, w2b)
        return first.reshape(_rebuilt_shape(module)) * second.reshape(_rebuilt_shape(module))
    if module.kind == LOKR:
        # kron_weight(…, scale=1): lokr.diff_weight would divide its gamma by the rank itself (its
        # rank_scale); A1111's alpha/dim is applied with every other type's scale in module_delta.
        return lokr.kron_weight(
            part("lokr_w1"), part("lokr_w1_a"), part("lokr_w1_b"),
            part("lokr_w2"), part("lokr_w2_a"), part("lokr_w2_b"), part("lokr_t2"),
            scale=1.0, backend=LYCORIS_BACKEND,
        )
    if module.kind == IA3:
        vector, on_input = part("weight"), module.part("on_input")
        assert vector is not None and on_input is not None
        # W ⊙ w: one value per output row, or per input column when on_input.
        axis = 1 if bool(on_input.item()) else 0
        shape = [1] * weight.dim()
        shape[axis] = -1
        return _f32(weight.detach(), device) * vector.reshape(shape)
    if module.kind == FULL:
        diff = part("diff")
        assert diff is not None
        return diff
    if module.kind == NORM:
        w_norm = part("w_norm")
        assert w_norm is not None
        return w_norm
    raise AssertionError(f"no ΔW for {module.kind}")


def _conventional(wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    return wa.reshape(wa.shape[0], -1) @ wb.reshape(wb.shape[0], -1)


def _onto(delta: torch.Tensor, weight_shape: tuple[int, ...]) -> torch.Tensor:
    """ΔW in the weight's shape: reshaped when the sizes agree (A1111 finalize_updown), a 4-channel conv_in ΔW
    zero-padded to a 9-channel inpainting UNet's."""
    if delta.numel() == _numel(weight_shape):
        return delta.reshape(weight_shape)
    padded_shape = (weight_shape[0], 4, *weight_shape[2:])
    if _is_inpaint_conv_in(padded_shape, weight_shape) and delta.numel() == _numel(padded_shape):
        return torch.nn.functional.pad(delta.reshape(padded_shape), (0, 0, 0, 0, 0, 5))
    raise ValueError(f"ΔW of shape {_describe(tuple(delta.shape))} does not fit a {_describe(weight_shape)} weight")


def _dora(delta: torch.Tensor, original: torch.Tensor, magnitude: torch.Tensor, per_output: bool) -> torch.Tensor:
    """A1111 apply_weight_decompose: M = W + ΔW₁, DoRA = M·(magnitude/‖M‖) − W, ‖·‖ per input channel (A1111)
    or per output row (see _dora_per_output); lycoris' weight_decompose computes the rescaled M."""
    from lycoris.functional import weight_decompose

    if per_output:
        shape = (original.shape[0], *[1] * (original.dim() - 1))
    else:
        shape = (1, original.shape[1], *[1] * (original.dim() - 2))
    merged = original + delta
    rescaled = weight_decompose(merged, magnitude.reshape(shape), 1, wd_on_out=per_output, backend=LYCORIS_BACKEND)
    return rescaled - original


def _bias_delta(
    module: LoraModule, target: torch.nn.Module, device: torch.device, multiplier: float
) -> torch.Tensor | None:
    t = module.tensors
    bias, weight = getattr(target, "bias", None), getattr(target, "weight", None)
    assert isinstance(weight, torch.Tensor)
    dtype: torch.dtype = bias.dtype if isinstance(bias, torch.Tensor) else weight.dtype
    if "diff_b" in t or "b_norm" in t:
        # A1111's ex_bias: multiplied by the multiplier only.
        extra = _f32(t["diff_b"] if "diff_b" in t else t["b_norm"], device).reshape(-1)
        return (extra * multiplier).to(dtype)
    if "lora_up.bias" in t:
        # PEFT lora_bias: the up projection's bias, scaled as its weight is.
        return (_f32(t["lora_up.bias"], device).reshape(-1) * (module.factor * multiplier)).to(dtype)
    return None
