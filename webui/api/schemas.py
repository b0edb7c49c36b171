"""The JSON shapes of A1111's /sdapi/v1 (request and response models, field names and API defaults as A1111 1.10).
Must not import torch, webui.engine or gradio; pydantic only, no behaviour beyond parsing and defaults."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from webui.api.validation import Name, PromptText, require_unicode
from webui.core.params import MAX_PROMPT_CHARACTERS

# A1111's API defaults differ from its UI (spec k.3): 50 steps and the Euler sampler via sampler_index.
API_DEFAULT_STEPS = 50
API_DEFAULT_SAMPLER_INDEX = "Euler"
# Bounds on the free-form parts of a request, far beyond what A1111 clients send: a request is refused (422 naming
# the field and the limit) before anything reads it further.
MAX_LIST_ITEMS = 256
MAX_SCRIPTS = 64
# An infotext holds a prompt, a negative prompt and the settings lines.
MAX_INFOTEXT_CHARACTERS = 2 * MAX_PROMPT_CHARACTERS + 8192
InfotextText = Annotated[str, Field(max_length=MAX_INFOTEXT_CHARACTERS), BeforeValidator(require_unicode)]


class _LenientModel(BaseModel):
    """Unknown keys are dropped (clients send fields of newer A1111 versions and of extensions).

    NaN and infinities are refused: they could not be echoed back as JSON.
    """

    model_config = ConfigDict(extra="ignore", populate_by_name=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        # Clients (webuiapi, bots) send null for fields they leave alone; A1111's pydantic v1 models
        # treated most of those as "use the default", so null never turns into a type error here.
        if not isinstance(data, dict):
            return data
        cleaned = dict(data)
        for name, field in cls.model_fields.items():
            key = field.alias or name
            if key in cleaned and cleaned[key] is None and field.default is not None:
                del cleaned[key]
        return cleaned


class Txt2ImgApiRequest(_LenientModel):
    """A1111's StableDiffusionTxt2ImgProcessingAPI: every field optional, with the API defaults."""

    model_config = ConfigDict(
        extra="ignore", populate_by_name=True, allow_inf_nan=False, title="StableDiffusionTxt2ImgProcessingAPI"
    )

    prompt: PromptText = ""
    negative_prompt: PromptText = ""
    styles: Annotated[list[Name], Field(max_length=MAX_LIST_ITEMS)] | None = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: Name | None = None
    scheduler: Name | None = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = API_DEFAULT_STEPS
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = None
    denoising_strength: float | None = None
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: Annotated[dict[Name, Any], Field(max_length=MAX_LIST_ITEMS)] | None = None
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: Name | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool = False
    firstpass_image: str | None = None
    comments: Annotated[dict[Name, Any], Field(max_length=MAX_LIST_ITEMS)] | None = None
    enable_hr: bool = False
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: Name | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: Name | None = None
    hr_sampler_name: Name | None = None
    hr_scheduler: Name | None = None
    hr_prompt: PromptText = ""
    hr_negative_prompt: PromptText = ""
    force_task_id: Name | None = None
    sampler_index: Name = API_DEFAULT_SAMPLER_INDEX
    script_name: Name | None = None
    script_args: list[Any] = Field(default_factory=list, max_length=MAX_LIST_ITEMS)
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[Name, Any] = Field(default_factory=dict, max_length=MAX_SCRIPTS)
    infotext: InfotextText | None = None


class TextToImageResponse(BaseModel):
    """images: plain base64 files (no data: prefix); info: Processed.js() as a JSON string."""

    images: list[str] | None = None
    parameters: dict[str, Any]
    info: str


class ProgressState(BaseModel):
    """A1111's shared.state.dict()."""

    skipped: bool = False
    interrupted: bool = False
    stopping_generation: bool = False
    job: str = ""
    job_count: int = 0
    job_timestamp: str = "0"
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0


class ProgressResponse(BaseModel):
    progress: float
    eta_relative: float
    state: ProgressState
    current_image: str | None = None
    textinfo: str | None = None
    current_task: str | None = None


class PngInfoRequest(_LenientModel):
    image: str = ""


class PngInfoResponse(BaseModel):
    info: str
    items: dict[str, Any]
    parameters: dict[str, Any]


class SdModelItem(BaseModel):
    title: str
    model_name: str
    hash: str | None
    sha256: str | None
    filename: str
    config: str | None = None


class SamplerItem(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, Any]


class VaeItem(BaseModel):
    """One entry of A1111's GET /sdapi/v1/sd-vae."""

    model_name: str
    filename: str


class SchedulerItem(BaseModel):
    name: str
    label: str
    aliases: list[str] | None
    default_rho: float
    need_inner_model: bool


class EmbeddingItem(BaseModel):
    """One embedding of A1111's GET /sdapi/v1/embeddings: its training step and checkpoint (A1111's own .pt files
    record them; null otherwise), its width (SDXL: both encoders' added up) and its number of vectors."""

    step: int | None
    sd_checkpoint: str | None
    sd_checkpoint_name: str | None
    shape: int
    vectors: int


class EmbeddingsResponse(BaseModel):
    loaded: dict[str, EmbeddingItem]
    skipped: dict[str, EmbeddingItem]


class LoraItem(BaseModel):
    """One entry of A1111's GET /sdapi/v1/loras (from its built-in Lora extension)."""

    name: str
    alias: str
    path: str
    metadata: dict[str, Any]


class PromptStyleItem(BaseModel):
    """One entry of A1111's GET /sdapi/v1/prompt-styles; dividers (several styles files) have null texts."""

    name: str
    prompt: str | None
    negative_prompt: str | None


class ScriptsList(BaseModel):
    txt2img: list[str]
    img2img: list[str]
