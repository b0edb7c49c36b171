"""EngineRunner: the queue's production executor; runs txt2img and checkpoint-load jobs on the engine, saves images.
Must not import gradio or fastapi; imports torch through webui.engine, so main imports this module lazily."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from webui.app.outputs import DEFAULT_FILENAME_PATTERN, Outputs, SavedImage, filename_fields_for
from webui.app.queue import (
    JobReporter,
    JobRequest,
    LoadCheckpointRequest,
    RefreshEmbeddingsRequest,
    Txt2ImgRequest,
    UnloadCheckpointRequest,
)
from webui.core.events import JobControl, Progress
from webui.core.hooks import HookPoint, Hooks, ModelLoadedContext, NoHooks
from webui.core.params import GenerationParams, resolve_seed
from webui.engine.families import Family
from webui.engine.generate import generate
from webui.engine.model_manager import LoadedModel, ModelManager
from webui.engine.model_registry import CHECKPOINT_SUFFIX
from webui.engine.networks.activation import ExtraNetworks
from webui.engine.networks.registry import LoraRegistry
from webui.engine.networks.textual_inversion import EmbeddingDatabase
from webui.engine.vae import cheap_preview


class EngineRunner:
    """Runs one job at a time on the queue's worker thread, the only thread that touches the model.

    Settings read through callables (outputs folder, preview interval, file format) are read once per
    job, so a change made in the UI applies from the next job on.
    """

    def __init__(
        self,
        manager: ModelManager,
        outputs: Callable[[], Outputs],
        preview_every_n_steps: Callable[[], int],
        version: str,
        on_saved: Callable[[SavedImage], None] | None = None,
        image_format: Callable[[], str] | None = None,
        filename_pattern: Callable[[], str] | None = None,
        hooks: Hooks | None = None,
        embeddings: EmbeddingDatabase | None = None,
        loras: LoraRegistry | None = None,
    ) -> None:
        self.manager = manager
        self.outputs = outputs
        self.preview_every_n_steps = preview_every_n_steps
        self.version = version
        self.on_saved = on_saved
        self.image_format = image_format
        self.filename_pattern = filename_pattern
        # The extensions' hooks (webui.app.extensions.ExtensionHost); none by default.
        self.hooks: Hooks = hooks or NoHooks()
        # Textual-inversion embeddings (None: none are used); refitted on this thread only, beside the model.
        self.embeddings = embeddings
        # LoRA files by name, each parsed once per file version (None: `<lora:…>` tags are ignored).
        self.networks = ExtraNetworks(loras) if loras is not None else None
        # Created on the first unsaved job only; it holds files just until their submitter has read them.
        self._scratch_outputs: Outputs | None = None

    def __call__(self, request: JobRequest, reporter: JobReporter, control: JobControl) -> None:
        if isinstance(request, LoadCheckpointRequest):
            self._load_checkpoint(request.checkpoint, request.vae, reporter, control)
        elif isinstance(request, Txt2ImgRequest):
            self._txt2img(request.params, reporter, control, save=request.save)
        elif isinstance(request, UnloadCheckpointRequest):
            self.manager.unload()
            reporter.message("Checkpoint unloaded")
        elif isinstance(request, RefreshEmbeddingsRequest):
            self._refresh_embeddings(reporter)
        else:
            raise TypeError(f"runner: unsupported request type {type(request).__name__}")

    def loaded_checkpoint(self) -> tuple[str, str | None] | None:
        """(name, short hash) of the loaded model, or None; safe from any thread (one attribute read)."""
        current = self.manager.current
        if current is None:
            return None
        return current.info.name, current.short_hash

    def _load_checkpoint(self, checkpoint: str, vae: str, reporter: JobReporter, control: JobControl) -> None:
        if control.interrupted:
            return
        reporter.message(f"Loading checkpoint {checkpoint}")
        # No allow_outside_paths: names from requests may only reach files inside the model folders.
        loaded = self._ensure_model(checkpoint, vae)
        reporter.message(f"Loaded {loaded.info.stem}" + (f" [{loaded.short_hash}]" if loaded.short_hash else ""))

    def _refresh_embeddings(self, reporter: JobReporter) -> None:
        """Rescan the embeddings folders and fit them to the loaded model's encoders (their widths, its tokenizer)."""
        if self.embeddings is None:
            reporter.message("Embeddings are not used by this server")
            return
        model = self.manager.current
        if model is None:
            reporter.message("No model loaded: embeddings are read when one loads")
            return
        self._fit_embeddings(model)
        reporter.message(f"Embeddings: {len(self.embeddings.loaded)} loaded, {len(self.embeddings.skipped)} skipped")

    def _fit_embeddings(self, model: LoadedModel) -> None:
        """Rescan the embeddings and fit them to `model` (its encoders' widths, its tokenizer), as A1111 does on
        every model load and on refresh-embeddings."""
        if self.embeddings is not None:
            widths = model.family.embedding_widths(model.components.modules())
            self.embeddings.refresh(model.family, model.tokenizer, widths)

    def _txt2img(self, params: GenerationParams, reporter: JobReporter, control: JobControl, save: bool = True) -> None:
        if control.interrupted:
            return
        if self._needs_load(params.checkpoint):
            reporter.message(f"Loading checkpoint {params.checkpoint}" if params.checkpoint else "Loading checkpoint")
        model = self._ensure_model(params.checkpoint, params.vae)
        if self.embeddings is not None:
            # A1111 rescans the embeddings folders before every job (when their modification time changed).
            self.embeddings.refresh_for_model(model)
        outputs = self.outputs() if save else self._scratch()
        image_format = self.image_format() if self.image_format is not None else params.output_format
        pattern = self.filename_pattern() if self.filename_pattern is not None else DEFAULT_FILENAME_PATTERN
        on_denoised = self._preview_callback(reporter, self.preview_every_n_steps(), model.family)
        # The queue resolves -1 at submit; resolving again only matters when the runner is called directly.
        first_seed = resolve_seed(params.seed)
        for batch in generate(
            model, params, first_seed, self.version, control, reporter.progress, on_denoised, hooks=self.hooks,
            embeddings=self.embeddings.lookup if self.embeddings is not None else None,
            networks=self.networks, on_warning=reporter.warning,
        ):
            # Saved as each batch decodes, so a later failure or interrupt keeps what was already made.
            for generated in batch:
                fields = filename_fields_for(params, generated.seed, model.info.stem, model.short_hash)
                saved = outputs.save(
                    generated.image, generated.infotext, generated.seed, image_format,
                    filename_fields=fields, pattern=pattern,
                )
                reporter.image(saved)
                if save and self.on_saved is not None:
                    self.on_saved(saved)

    def _ensure_model(self, checkpoint: str | None, vae: str) -> LoadedModel:
        """manager.ensure, then HookPoint.MODEL_LOADED when a different model came back."""
        before = self.manager.current
        model = self.manager.ensure(checkpoint, vae=vae)
        if model is not before:
            self._fit_embeddings(model)
        if model is not before and self.hooks.has(HookPoint.MODEL_LOADED):
            self.hooks.run(HookPoint.MODEL_LOADED, ModelLoadedContext(model.info.name, model.short_hash or "", model))
        return model

    def _scratch(self) -> Outputs:
        if self._scratch_outputs is None:
            self._scratch_outputs = Outputs(Path(tempfile.mkdtemp(prefix="webui-unsaved-")))
        return self._scratch_outputs

    @staticmethod
    def _preview_callback(
        reporter: JobReporter, every_n_steps: int, model_family: Family
    ) -> Callable[[Progress, torch.Tensor], None] | None:
        """None when previews are off, so the sampler does no preview work at all."""
        if every_n_steps <= 0:
            return None

        def on_denoised(progress: Progress, denoised: torch.Tensor) -> None:
            # Progress steps count from 1: previews at steps N, 2N, ... as A1111's "every N steps".
            if progress.step % every_n_steps == 0:
                reporter.preview(cheap_preview(denoised, model_family))

        return on_denoised

    def _needs_load(self, checkpoint: str | None) -> bool:
        """A guess for the status line only (ensure decides): is a different model about to be loaded?"""
        current: LoadedModel | None = self.manager.current
        if current is None:
            return True
        if checkpoint is None:
            return False
        known_names = {
            current.info.name,
            current.info.name.removesuffix(CHECKPOINT_SUFFIX),
            current.info.stem,
            current.info.path.name,
            current.short_hash,
        }
        return checkpoint.strip() not in known_names
