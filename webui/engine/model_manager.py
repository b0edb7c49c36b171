"""Keeping checkpoints loaded: weights swapped into kept module skeletons, a RAM cache, VAE choice, rollback.
Called only from the generating thread; must not import gradio, fastapi or webui.app."""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from webui.core.params import AUTOMATIC_VAE
from webui.engine.checkpoint_loading import (
    COMPONENTS,
    CheckpointLoadError,
    CheckpointWeights,
    ModelComponents,
    StateDict,
    build_components,
    check_fits,
    inspect_checkpoint,
    is_v_prediction,
    read_checkpoint,
    read_checkpoint_vae,
    read_component_config,
    read_vae_file,
    sidecar_config_dir,
)
from webui.engine.clip_tokenizer import ClipTokenizer
from webui.engine.devices import DevicePolicy, empty_cache
from webui.engine.families import Family
from webui.engine.model_registry import ModelInfo, ModelRegistry, VaeRegistry
from webui.engine.patches import PatchState, unpatch

logger = logging.getLogger(__name__)

__all__ = ["CheckpointLoadError", "LoadedModel", "ModelManager", "sidecar_config_dir"]

FileKey = tuple[Path, int, float]


def file_key(info: ModelInfo) -> FileKey:
    """A file version: a changed file (same name, new mtime or size) is a different model."""
    return (info.path, info.size, info.mtime)


@dataclass(slots=True)
class LoadedModel:
    """The modules of one loaded checkpoint and what generation needs to know about it."""

    info: ModelInfo
    family: Family
    config_dir: Path
    components: ModelComponents
    tokenizer: ClipTokenizer
    alphas_cumprod: torch.Tensor
    vae_scaling_factor: float
    prediction_type: str
    policy: DevicePolicy
    vae_file: ModelInfo | None
    hash_lookup: Callable[[ModelInfo], str | None]
    # The weight patches (LoRA) merged now; webui.engine.patches is the only code that changes it.
    patch_state: PatchState = field(default_factory=PatchState)

    def named_modules(self) -> dict[str, torch.nn.Module]:
        """Every module by "<component>.<path>" (the patch layer's module names)."""
        return {
            f"{component}.{path}": module
            for component, root in self.components.modules().items()
            for path, module in root.named_modules()
            if path
        }

    @property
    def unet(self) -> torch.nn.Module:
        return self.components.unet

    @property
    def vae(self) -> torch.nn.Module:
        return self.components.vae

    @property
    def text_encoder(self) -> torch.nn.Module:
        return self.components.text_encoder

    @property
    def text_encoder_2(self) -> torch.nn.Module | None:
        return self.components.text_encoder_2

    @property
    def short_hash(self) -> str | None:
        """A1111's 10-character model hash, or None while it is still being computed in the background."""
        return self.hash_lookup(self.info)

    @property
    def vae_name(self) -> str | None:
        """The external VAE's file name as A1111's infotext `VAE` has it; None for the checkpoint's own VAE."""
        return self.vae_file.path.name if self.vae_file is not None else None

    @property
    def vae_hash(self) -> str | None:
        return self.hash_lookup(self.vae_file) if self.vae_file is not None else None


@dataclass(slots=True)
class CachedWeights:
    """A model's weights in RAM (CPU, target dtypes) and what is needed to place them back without the file."""

    info: ModelInfo
    family: Family
    config_dir: Path
    state_dicts: dict[str, StateDict]
    alphas_cumprod: torch.Tensor
    vae_scaling_factor: float
    prediction_type: str | None
    vae_file: ModelInfo | None


def config_signature(config_dir: Path) -> str:
    """The module configs' content: two checkpoints whose sidecars match can share one skeleton."""
    parts = []
    for component in COMPONENTS:
        if (config_dir / component / "config.json").is_file():
            parts.append(json.dumps(read_component_config(config_dir, component), sort_keys=True))
    return "\n".join(parts)


def _component_dtype(component: str, policy: DevicePolicy) -> torch.dtype:
    if component == "unet":
        return policy.unet_dtype
    if component == "vae":
        return policy.vae_dtype
    return policy.text_encoder_dtype


def convert_in_place(state_dict: StateDict, dtype: torch.dtype) -> StateDict:
    """Each floating tensor converted to `dtype`, dropping the original as it goes: no second full copy in RAM."""
    converted: StateDict = {}
    for name in list(state_dict):
        tensor = state_dict.pop(name)
        converted[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    return converted


def _weights_to_cache(weights: CheckpointWeights, info: ModelInfo, policy: DevicePolicy) -> CachedWeights:
    state_dicts = {
        component: convert_in_place(state_dict, _component_dtype(component, policy))
        for component, state_dict in weights.state_dicts.items()
    }
    weights.state_dicts.clear()
    return CachedWeights(
        info=info,
        family=weights.family,
        config_dir=weights.config_dir,
        state_dicts=state_dicts,
        alphas_cumprod=weights.alphas_cumprod,
        vae_scaling_factor=weights.vae_scaling_factor,
        prediction_type=weights.prediction_type,
        vae_file=None,
    )


def _module_weights_on_cpu(module: torch.nn.Module) -> StateDict:
    """The module's tensors on the CPU: the same tensors on a CPU device (free), a pinned copy from a GPU."""
    weights: StateDict = {}
    for name, tensor in module.state_dict().items():
        if tensor.device.type == "cpu":
            weights[name] = tensor
        else:
            host = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=torch.cuda.is_available())
            weights[name] = host.copy_(tensor)
    return weights


class ModelManager:
    """Which checkpoints are loaded on the device and which wait in RAM; a failed load changes neither.

    `models_on_device()` (A1111's sd_checkpoints_limit, default 1) bounds the models kept on the
    device; `ram_cache_size()` (A1111's sd_checkpoint_cache, default 1 here) bounds the models kept
    in RAM after being swapped out. Both are read at each load, so settings apply from the next swap.
    """

    def __init__(
        self,
        registry: ModelRegistry,
        policy: DevicePolicy,
        vae_registry: VaeRegistry | None = None,
        ram_cache_size: Callable[[], int] = lambda: 1,
        models_on_device: Callable[[], int] = lambda: 1,
    ) -> None:
        self.registry = registry
        self.policy = policy
        self.vae_registry = vae_registry or VaeRegistry([], registry.hasher)
        self.ram_cache_size = ram_cache_size
        self.models_on_device = models_on_device
        # Most recently used last; `current` is assigned once a load has fully succeeded, so other
        # threads reading it never see a half-placed model.
        self._resident: OrderedDict[FileKey, LoadedModel] = OrderedDict()
        self._ram_cache: OrderedDict[FileKey, CachedWeights] = OrderedDict()
        self.current: LoadedModel | None = None
        # One tokenizer for every model: building one costs time and memory the allocator keeps.
        self._tokenizer: ClipTokenizer | None = None

    # ---- public -------------------------------------------------------------------------------

    def ensure(self, query: str | None, allow_outside_paths: bool = False, vae: str = AUTOMATIC_VAE) -> LoadedModel:
        """The model for `query` (None: the loaded one, else the first checkpoint) with VAE choice `vae`."""
        info = self._resolve(query, allow_outside_paths)
        vae_file = self.vae_registry.resolve(vae, info)
        key = file_key(info)
        self.registry.hasher.hash_in_background(info)
        if vae_file is not None:
            self.registry.hasher.hash_in_background(vae_file)

        resident = self._resident.get(key)
        if resident is not None:
            self._resident.move_to_end(key)
            if not _same_file(resident.vae_file, vae_file):
                self._swap_vae(resident, vae_file)
            self.current = resident
            return resident

        cached = self._ram_cache.pop(key, None)
        if cached is None:
            if len(self._resident) >= max(1, self.models_on_device()):
                # The model about to be swapped out will take a RAM cache slot: make room before reading.
                self._trim_ram_cache(max(0, self.ram_cache_size() - 1))
            logger.info("loading checkpoint %s", info.name)
            cached, skeleton = self._read(info)
        else:
            skeleton = self._skeleton_for(cached.family, cached.config_dir)
        if not _same_file(cached.vae_file, vae_file):
            try:
                cached.state_dicts["vae"] = self._read_vae(info, vae_file, skeleton.vae)
            except CheckpointLoadError:
                self._ram_cache[key] = cached  # a bad VAE must not cost the cached checkpoint
                raise
            cached.vae_file = vae_file
        loaded = self._place(cached, skeleton)
        self.current = loaded
        self._trim_ram_cache(max(0, self.ram_cache_size()))
        return loaded

    def unload(self) -> ModelInfo | None:
        """Drop every loaded and RAM-cached model and free their memory; returns what was current."""
        current, self.current = self.current, None
        self._resident.clear()
        self._ram_cache.clear()
        empty_cache(self.policy.device)
        return current.info if current is not None else None

    def ram_cached(self) -> list[ModelInfo]:
        """The models waiting in RAM, oldest first."""
        return [entry.info for entry in self._ram_cache.values()]

    def resident(self) -> list[ModelInfo]:
        """The models on the device, least recently used first."""
        return [model.info for model in self._resident.values()]

    # ---- loading ------------------------------------------------------------------------------

    def _resolve(self, query: str | None, allow_outside_paths: bool) -> ModelInfo:
        if query is None:
            if self.current is not None:
                return self.current.info
            models = self.registry.scan()
            if not models:
                raise CheckpointLoadError(
                    f"checkpoint: no checkpoint found; {self.registry.where_to_put_checkpoints()}"
                )
            return models[0]
        return self.registry.resolve(query, allow_outside_paths=allow_outside_paths)

    def _skeleton_for(self, family: Family, config_dir: Path) -> ModelComponents:
        """A resident model's modules when they fit (only their shapes are used), else a new empty skeleton."""
        signature = config_signature(config_dir)
        for model in self._resident.values():
            if model.family == family and config_signature(model.config_dir) == signature:
                return model.components
        return build_components(family, config_dir)

    def _read(self, info: ModelInfo) -> tuple[CachedWeights, ModelComponents]:
        """The checkpoint's weights in RAM at the device dtypes, checked against the family's modules."""
        layout = inspect_checkpoint(info)
        skeleton = self._skeleton_for(layout.family, layout.config_dir)
        weights = read_checkpoint(info, skeleton, lambda component: _component_dtype(component, self.policy), layout)
        cached = _weights_to_cache(weights, info, self.policy)
        modules = skeleton.modules()
        if set(modules) != set(cached.state_dicts):
            raise CheckpointLoadError(
                f"{info.name}: the file has components {sorted(cached.state_dicts)}, "
                f"the {cached.family.label} model needs {sorted(modules)}"
            )
        for component, module in modules.items():
            check_fits(module, cached.state_dicts[component], component, info.name)
        return cached, skeleton

    def _read_vae(self, checkpoint: ModelInfo, vae_file: ModelInfo | None, vae: torch.nn.Module) -> StateDict:
        if vae_file is None:
            weights = read_checkpoint_vae(checkpoint, vae)
            what = f"{checkpoint.name} (its own VAE)"
        else:
            logger.info("loading VAE %s", vae_file.name)
            weights = read_vae_file(vae_file.path, vae)
            what = f"VAE {vae_file.name}"
        check_fits(vae, weights, "VAE", what)
        return convert_in_place(weights, self.policy.vae_dtype)

    def _swap_vae(self, model: LoadedModel, vae_file: ModelInfo | None) -> None:
        weights = self._read_vae(model.info, vae_file, model.vae)
        _put_weights(model.vae, weights, self.policy.device)
        model.vae_file = vae_file

    def _place(self, cached: CachedWeights, skeleton: ModelComponents) -> LoadedModel:
        """Put `cached` on the device in `skeleton`, swapping out the least recently used model if the device is full.

        `skeleton` is either a resident model's modules (same family and config: weights are copied in,
        nothing is rebuilt) or a new empty one. If placing fails (out of memory), the swapped-out model
        is put back and the error raised.
        """
        evicted: tuple[FileKey, LoadedModel, CachedWeights] | None = None
        victim = next(iter(self._resident.values())) if len(self._resident) >= max(1, self.models_on_device()) else None
        if any(model.components is skeleton for model in self._resident.values() if model is not victim):
            # Those modules belong to a model that stays on the device: the new one needs its own.
            skeleton = build_components(cached.family, cached.config_dir)
        if victim is not None:
            key = file_key(victim.info)
            evicted = (key, victim, self._to_ram(victim))
            del self._resident[key]
            if victim.components is not skeleton:
                # Another family: free the old modules' memory before the new ones are filled.
                for module in victim.components.modules().values():
                    module.to("meta")
                empty_cache(self.policy.device)
        try:
            for component, module in skeleton.modules().items():
                _put_weights(module, cached.state_dicts[component], self.policy.device)
        except torch.cuda.OutOfMemoryError as error:
            empty_cache(self.policy.device)
            if evicted is not None:
                self._restore(*evicted)
            raise CheckpointLoadError(f"{cached.info.name}: out of GPU memory while loading") from error
        if evicted is not None:
            self._ram_cache[evicted[0]] = evicted[2]
            empty_cache(self.policy.device)
        prediction_type = cached.prediction_type
        if prediction_type is None:
            prediction_type = "v_prediction" if is_v_prediction(skeleton.unet) else "epsilon"
            logger.info("%s: %s model (A1111's v-prediction test)", cached.info.name, prediction_type)
        loaded = LoadedModel(
            info=cached.info,
            family=cached.family,
            config_dir=cached.config_dir,
            components=skeleton,
            tokenizer=self._shared_tokenizer(),
            alphas_cumprod=cached.alphas_cumprod,
            vae_scaling_factor=cached.vae_scaling_factor,
            prediction_type=prediction_type,
            policy=self.policy,
            vae_file=cached.vae_file,
            hash_lookup=self.registry.cached_short_hash,
        )
        self._resident[file_key(cached.info)] = loaded
        return loaded

    def _shared_tokenizer(self) -> ClipTokenizer:
        if self._tokenizer is None:
            self._tokenizer = ClipTokenizer()
        return self._tokenizer

    def _to_ram(self, model: LoadedModel) -> CachedWeights:
        # The RAM cache holds a checkpoint's own weights only: merged LoRAs are taken out first.
        unpatch(model)
        return CachedWeights(
            info=model.info,
            family=model.family,
            config_dir=model.config_dir,
            state_dicts={name: _module_weights_on_cpu(module) for name, module in model.components.modules().items()},
            alphas_cumprod=model.alphas_cumprod,
            vae_scaling_factor=model.vae_scaling_factor,
            prediction_type=model.prediction_type,
            vae_file=model.vae_file,
        )

    def _restore(self, key: FileKey, model: LoadedModel, weights: CachedWeights) -> None:
        for component, module in model.components.modules().items():
            _put_weights(module, weights.state_dicts[component], self.policy.device)
        self._resident[key] = model
        self._resident.move_to_end(key, last=False)

    def _trim_ram_cache(self, keep: int) -> None:
        while len(self._ram_cache) > keep:
            _, dropped = self._ram_cache.popitem(last=False)
            logger.info("dropping %s from the RAM cache", dropped.info.name)


def _same_file(a: ModelInfo | None, b: ModelInfo | None) -> bool:
    if a is None or b is None:
        return a is b
    return file_key(a) == file_key(b)


def _put_weights(module: torch.nn.Module, weights: StateDict, device: torch.device) -> None:
    """Load `weights` into the module's kept skeleton: shared on the CPU, copied into place on a GPU."""
    if device.type == "cpu":
        module.load_state_dict(weights, strict=True, assign=True)
        return
    parameters = dict(module.named_parameters())
    buffers = dict(module.named_buffers())
    on_device = all(t.device == device for t in (*parameters.values(), *buffers.values()))
    if not on_device:
        # A fresh skeleton (meta tensors): take the host tensors, then move the whole module once.
        module.load_state_dict(weights, strict=True, assign=True)
        module.to(device)
        return
    with torch.no_grad():
        for name, source in weights.items():
            target: torch.Tensor | None = parameters.get(name)
            if target is None:
                target = buffers[name]
            target.copy_(source, non_blocking=source.is_pinned())
    torch.cuda.synchronize(device)
