"""Extension hook points and the context objects the engine and the app hand to them (ComfyUI/InvokeAI style callbacks).
Standard library only: tensors and images are typed `Any` here (torch.Tensor / PIL.Image at run time), so the
engine, the app and webui.extension_api can all share these types without importing each other."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from webui.core.params import GenerationParams


class HookPoint(enum.Enum):
    """Where an extension can act. The value names the context class the hook receives."""

    BEFORE_GENERATION = "BeforeGenerationContext"  # once per job, before the model is used: rewrite params
    CONDITIONING = "ConditioningContext"  # after the prompts are encoded: change the embeddings
    CFG = "CfgContext"  # every denoiser call, after cond/uncond are combined: change the guided prediction
    STEP = "StepContext"  # after every sampler step: read (or edit in place) the latents
    IMAGE = "ImageContext"  # every image right after the VAE decode: replace the picture
    BEFORE_SAVE = "BeforeSaveContext"  # every image before its infotext is written: add infotext fields
    MODEL_LOADED = "ModelLoadedContext"  # a different checkpoint was loaded
    APP_STARTED = "AppStartedContext"  # the web server runs: add REST routes
    INFOTEXT_PASTED = "InfotextPastedContext"  # an infotext is pasted into txt2img: rewrite its fields
    WEIGHT_PATCHES = "WeightPatchesContext"  # once per job: add weight patches (merged for the job, as LoRAs are)


@dataclass
class BeforeGenerationContext:
    """`params` may be replaced (params.replace(...)); `infotext_fields` are added to every image of the job."""

    params: GenerationParams
    seed: int
    infotext_fields: dict[str, str] = field(default_factory=dict)


@dataclass
class ConditioningContext:
    """Prompt text → embedding tensor, for every scheduled text of the prompt and of the negative prompt."""

    params: GenerationParams
    cond: dict[str, Any]
    uncond: dict[str, Any]


@dataclass
class CfgContext:
    """One denoiser call. `cond_pred`/`uncond_pred`: the UNet's noise predictions for the prompt and the negative
    prompt; `guided` = uncond + cfg_scale·(cond − uncond), which a hook may replace. `x` is the UNet input,
    `sigma` the noise level per image (shape [B]), `call_index` counts denoiser calls from 0."""

    params: GenerationParams
    x: Any
    sigma: Any
    cond_pred: Any
    uncond_pred: Any
    cfg_scale: float
    guided: Any
    call_index: int


@dataclass
class StepContext:
    """After a sampler step: `x` the latents, `denoised` the x0 prediction, `sigma` the step's noise level."""

    params: GenerationParams
    step: int
    total_steps: int
    x: Any
    denoised: Any
    sigma: float


@dataclass
class ImageContext:
    """One decoded image (PIL); a hook may assign a new one of any size."""

    params: GenerationParams
    seed: int
    image: Any


@dataclass
class BeforeSaveContext:
    """One image about to get its infotext; add "Key": "value" pairs to `infotext_fields`."""

    params: GenerationParams
    seed: int
    image: Any
    infotext_fields: dict[str, str]


@dataclass
class ModelLoadedContext:
    """A checkpoint was loaded. `model` is the engine's loaded model: read it or clone it, never mutate it."""

    name: str
    short_hash: str
    model: Any


@dataclass(frozen=True)
class WeightPatchSpec:
    """An extension's weight patch. `deltas(modules)` gets "<component>.<path>" → torch module and returns
    path → (weight delta or None, bias delta or None), shaped like the module's tensors. `key` says when two jobs ask
    for the same patch (the merged weights are then kept); `label` names it in messages."""

    key: Any
    label: str
    deltas: Callable[[Any], Any]


@dataclass
class WeightPatchesContext:
    """Append WeightPatchSpec objects to `patches`; `family` is the loaded model's ("sd1", "sd2", "sdxl")."""

    params: GenerationParams
    family: str
    patches: list[WeightPatchSpec] = field(default_factory=list)


RouteEndpoint = Callable[..., Any]


@dataclass
class AppStartedContext:
    """The server is up. `add_route(path, endpoint, methods)` adds a REST route behind the API's auth."""

    add_route: Callable[[str, RouteEndpoint, list[str]], None]


@dataclass
class InfotextPastedContext:
    """A parsed infotext about to fill the txt2img controls; prompts and fields may be rewritten."""

    prompt: str
    negative_prompt: str
    fields: dict[str, str]


HookContext = (
    BeforeGenerationContext | ConditioningContext | CfgContext | StepContext | ImageContext | BeforeSaveContext
    | ModelLoadedContext | AppStartedContext | InfotextPastedContext | WeightPatchesContext
)
HookFunction = Callable[[Any], None]


class Hooks(Protocol):
    """What the engine calls. The extension host implements it; every call is isolated there."""

    def has(self, point: HookPoint) -> bool:
        """True when at least one hook is registered at `point` (lets the engine skip building a context)."""
        ...

    def run(self, point: HookPoint, context: HookContext) -> None:
        """Call every hook registered at `point` with `context`; a hook that raises never stops the job."""
        ...


class NoHooks:
    """The default: nothing registered, nothing called."""

    def has(self, point: HookPoint) -> bool:
        return False

    def run(self, point: HookPoint, context: HookContext) -> None:
        return None

