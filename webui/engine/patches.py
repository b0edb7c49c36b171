"""The per-job patched model: weight patches (LoRA deltas) merged into module weights and undone exactly.
The one place that changes a loaded model's weights; must not import gradio, fastapi or webui.app."""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol, cast

import torch

from webui.core.hooks import WeightPatchSpec


@dataclass(frozen=True, slots=True)
class LowRank:
    """ΔW = scale · (up @ down) in the weight's shape: `up` (out, rank), `down` (rank, in · kernel), float32 on the
    weight's device. Merged as W + ΔW in one GEMM (torch.addmm), so the full ΔW never exists on its own."""

    up: torch.Tensor
    down: torch.Tensor
    scale: float = 1.0


@dataclass(frozen=True, slots=True)
class ModuleDelta:
    """What one patch adds to one module: `weight` has the weight's shape, `bias` the bias's (either may be None);
    `low_rank` is the weight's delta as factors instead of `weight` (only from a patch's `merge_deltas`).

    Module paths are "<component>.<path inside it>", e.g. "unet.down_blocks.0.attentions.0.proj_in" or
    "text_encoder.text_model.encoder.layers.0.self_attn.q_proj" (components: unet, text_encoder, text_encoder_2, vae).
    """

    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    low_rank: LowRank | None = None


class PatchError(Exception):
    """A patch that could not be computed or does not fit; `label` names its file, the message says why."""

    def __init__(self, label: str, reason: str) -> None:
        super().__init__(f"{label}: {reason}")
        self.label = label
        self.reason = reason


class WeightPatch(Protocol):
    """A weight patch: `key` identifies it for "same set as last job", `label` names it (a file) in messages."""

    @property
    def key(self) -> Hashable: ...

    @property
    def label(self) -> str: ...

    def deltas(self, modules: Mapping[str, torch.nn.Module]) -> Mapping[str, ModuleDelta]:
        """Module path → delta, for the modules of `modules` (path → module) it changes; PatchError if it cannot.

        A patch may also have `merge_deltas(modules)`, the same deltas for merging, where a weight's delta may be
        `low_rank` factors; the merge uses it when it is there."""
        ...


class ExtensionPatch:
    """An extension's WeightPatchSpec (webui.core.hooks) as a WeightPatch: its (weight, bias) pairs become deltas."""

    def __init__(self, spec: WeightPatchSpec) -> None:
        self.spec = spec

    @property
    def key(self) -> Hashable:
        return ("extension", self.spec.label, self.spec.key)

    @property
    def label(self) -> str:
        return self.spec.label

    def deltas(self, modules: Mapping[str, torch.nn.Module]) -> Mapping[str, ModuleDelta]:
        result: dict[str, ModuleDelta] = {}
        for path, pair in dict(self.spec.deltas(modules)).items():
            weight, bias = pair
            result[path] = ModuleDelta(weight, bias)
        return result


@dataclass(slots=True)
class PatchState:
    """What is merged into one loaded model now: the requested patch keys, what failed, and the original tensors.

    Originals are the module's own Parameter objects, never written to: restoring puts them back, so the
    unpatched weights (and the RAM cache, which shares them on the CPU) are exact, byte for byte.
    """

    keys: tuple[Hashable, ...] = ()
    failures: tuple[PatchError, ...] = ()
    # (module path, "weight" | "bias") → (module, the original Parameter or None where the module had no bias)
    originals: dict[tuple[str, str], tuple[torch.nn.Module, torch.nn.Parameter | None]] = field(default_factory=dict)


class PatchableModel(Protocol):
    """A loaded model as the patch layer sees it (webui.engine.model_manager.LoadedModel)."""

    patch_state: PatchState

    def named_modules(self) -> Mapping[str, torch.nn.Module]: ...


def unpatch(model: PatchableModel) -> None:
    """Put every original tensor back; the model is then exactly the checkpoint's weights."""
    state = model.patch_state
    for (_, attribute), (module, original) in state.originals.items():
        if original is None:
            module.register_parameter(attribute, None)
        else:
            setattr(module, attribute, original)
    model.patch_state = PatchState()


class _PatchFailed(Exception):
    def __init__(self, index: int, error: PatchError) -> None:
        super().__init__(str(error))
        self.index = index
        self.error = error


# (module path, "weight" | "bias") → a merged Parameter of the previous set, whose memory the next merge may reuse.
Spare = dict[tuple[str, str], torch.nn.Parameter]


def _merge_one(
    state: PatchState, patch: WeightPatch, modules: Mapping[str, torch.nn.Module], spare: Spare
) -> None:
    """Merge one patch's deltas as they are computed (one ΔW in memory at a time) into the current tensors.

    A tensor an earlier patch of the set merged into is this layer's own and is added to in place; else the sum
    goes into the previous set's merged tensor of that module (`spare`, same shape, dtype and device), or a new
    one. So switching between sets over the same modules allocates no weight memory, and originals stay unwritten.
    """
    merge_deltas = getattr(patch, "merge_deltas", None)
    deltas = merge_deltas(modules) if callable(merge_deltas) else patch.deltas(modules)
    for path, delta in deltas.items():
        module = modules.get(path)
        if module is None:
            raise PatchError(patch.label, f"no module {path} in this model")
        parts: tuple[tuple[str, torch.Tensor | LowRank | None], ...] = (
            ("weight", delta.low_rank if delta.low_rank is not None else delta.weight), ("bias", delta.bias)
        )
        for attribute, tensor in parts:
            if tensor is None:
                continue
            current = getattr(module, attribute, None)
            weight = cast(torch.Tensor, module.weight)  # every patched module (Linear, Conv, norms) has one
            expected = tuple(current.shape) if current is not None else (weight.shape[0],)
            if not _fits(tensor, expected):
                shape = _shape_of(tensor)
                raise PatchError(patch.label, f"{path}.{attribute}: delta of shape {shape}, the model has {expected}")
            key = (path, attribute)
            if current is None:
                assert isinstance(tensor, torch.Tensor)  # a bias only, never low-rank
                merged = torch.nn.Parameter(tensor.to(device=weight.device, dtype=weight.dtype), requires_grad=False)
            elif key in state.originals:
                merged = cast(torch.nn.Parameter, current)
                _add(current, tensor, out=current)
            else:
                reused = spare.pop(key, None)
                if reused is not None and not _same_layout(reused, current):
                    reused = None
                summed = _add(current, tensor, out=reused)
                merged = reused if reused is not None else torch.nn.Parameter(summed, requires_grad=False)
            state.originals.setdefault(key, (module, current))
            if merged is not current:
                setattr(module, attribute, merged)


def _shape_of(delta: torch.Tensor | LowRank) -> tuple[int, ...]:
    if isinstance(delta, LowRank):
        return (int(delta.up.shape[0]), int(delta.down.shape[1]))
    return tuple(delta.shape)


def _fits(delta: torch.Tensor | LowRank, expected: tuple[int, ...]) -> bool:
    if isinstance(delta, LowRank):
        rows, columns = _shape_of(delta)
        return bool(expected) and rows == expected[0] and rows * columns == math.prod(expected)
    return tuple(delta.shape) == expected


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and a.is_contiguous()


def _add(current: torch.Tensor, delta: torch.Tensor | LowRank, out: torch.Tensor | None) -> torch.Tensor:
    """current + delta, summed in float32 and returned in current's dtype; written into `out` when given (which
    may be `current` itself)."""
    if isinstance(delta, LowRank):
        up = delta.up.to(current.device, torch.float32)
        down = delta.down.to(current.device, torch.float32)
        rows = current.shape[0]
        if current.dtype == torch.float32 and out is not None:
            if out is current:
                out.view(rows, -1).addmm_(up, down, alpha=delta.scale)
            else:
                torch.addmm(current.reshape(rows, -1), up, down, alpha=delta.scale, out=out.view(rows, -1))
            return out
        summed = torch.addmm(current.reshape(rows, -1).to(torch.float32), up, down, alpha=delta.scale)
        summed = summed.reshape(current.shape).to(current.dtype)
    else:
        increment = delta.to(current.device, torch.float32)
        if current.dtype == torch.float32 and out is not None:
            return torch.add(current, increment, out=out)
        summed = (current.to(torch.float32) + increment).to(current.dtype)
    return out.copy_(summed) if out is not None else summed


def _merged_tensors(state: PatchState) -> Spare:
    """The merged Parameters now in the modules (each module's last one), to reuse once the originals are back."""
    merged: Spare = {}
    for key, (module, _) in state.originals.items():
        tensor = getattr(module, key[1], None)
        if isinstance(tensor, torch.nn.Parameter):
            merged[key] = tensor
    return merged


def _merge_all(
    model: PatchableModel, patches: Sequence[WeightPatch], keys: tuple[Hashable, ...], spare: Spare
) -> None:
    modules = model.named_modules()
    model.patch_state = PatchState(keys=keys)
    with torch.no_grad():
        for index, patch in enumerate(patches):
            try:
                _merge_one(model.patch_state, patch, modules, spare)
            except PatchError as error:
                raise _PatchFailed(index, error) from None
            except Exception as error:  # a broken file must cost its own patch, never the job
                raise _PatchFailed(index, PatchError(patch.label, f"{type(error).__name__}: {error}")) from None


@contextmanager
def patched(model: PatchableModel, patches: Sequence[WeightPatch]) -> Iterator[tuple[PatchError, ...]]:
    """Run a job on `model` with `patches` merged (W' = W + ΣΔW); yields the patches that failed, each naming its file.

    The merged set stays in place after the job, so the next job asking for the same set costs nothing (A1111
    caches the applied set too); a different set, or none, restores the originals first.
    """
    keys = tuple(patch.key for patch in patches)
    if keys != model.patch_state.keys:
        spare = _merged_tensors(model.patch_state) if patches else {}
        unpatch(model)
        if patches:
            _merge(model, patches, keys, spare)
    yield model.patch_state.failures


def _merge(model: PatchableModel, patches: Sequence[WeightPatch], keys: tuple[Hashable, ...], spare: Spare) -> None:
    """All patches merged in prompt order; one that fails is taken out (the model restored first) and the rest
    merged again, so a bad file never leaves part of itself in the weights (only in merged tensors, reused)."""
    remaining = list(patches)
    failures: list[PatchError] = []
    while True:
        try:
            _merge_all(model, remaining, keys, spare)
        except _PatchFailed as failed:
            spare.update(_merged_tensors(model.patch_state))
            unpatch(model)
            failures.append(failed.error)
            del remaining[failed.index]
            continue
        model.patch_state.failures = tuple(failures)
        return
