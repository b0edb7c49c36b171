"""A job's extra networks: the prompt's `<lora:…>` tags resolved to files, loaded (cached by file version) and
turned into weight patches, with A1111's warnings and `Lora hashes`. Must not import gradio, fastapi or webui.app."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from webui.core.extra_networks import ExtraNetworkCall, format_hashes, hash_field_name
from webui.engine.families import Family
from webui.engine.networks.lora import LoraError, LoraNetwork, LoraPatch, load_lora_file
from webui.engine.networks.registry import LoraRegistry
from webui.engine.patches import WeightPatch

if TYPE_CHECKING:
    import torch

# A1111's lora_in_memory_limit is 0 (only the active set is kept); a few more make switching back and forth free.
LORA_FILES_IN_MEMORY = 8


@dataclass(slots=True)
class JobNetworks:
    """What one job gets from its tags: patches in prompt order, infotext fields, and warnings for the user."""

    patches: list[WeightPatch] = field(default_factory=list)
    infotext_fields: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


class ExtraNetworks:
    """LoRA files by name, parsed once per file version; called on the generating thread only."""

    def __init__(self, loras: LoraRegistry) -> None:
        self.loras = loras
        self._parsed: dict[Path, tuple[tuple[float, int], LoraNetwork]] = {}

    def for_job(self, calls: list[ExtraNetworkCall], family: Family, modules: Mapping[str, torch.nn.Module]) -> JobNetworks:
        """Patches for the prompt's LoRA tags; a missing, broken or other-family file is a warning, never a failure."""
        job = JobNetworks()
        lora_calls = [call for call in calls if call.is_lora]
        unknown_kinds = sorted({call.kind for call in calls if not call.is_lora})
        if unknown_kinds:
            job.warnings.append(f"Unknown extra network kinds ignored: {', '.join(unknown_kinds)}")
        if not lora_calls:
            return job
        files = self.loras.resolve_all([call.name for call in lora_calls])
        missing: list[str] = []
        hashes: dict[str, str] = {}
        for call in lora_calls:
            found = files.get(call.name)
            if found is None:
                missing.append(call.name)
                continue
            try:
                network = self._load(found.path)
            except LoraError as error:
                job.warnings.append(f"Lora {call.name} not loaded: {error}")
                continue
            patch = LoraPatch(network, family, call.te_multiplier, call.unet_multiplier, call.dyn)
            if patch.matched_modules(modules) == 0:
                job.warnings.append(
                    f"Lora {call.name} does not fit this {family.label} model "
                    f"(made for {found.sd_version}); it was not applied"
                )
            else:
                job.patches.append(patch)
            short_hash = self.loras.short_hash(found)
            if short_hash:
                hashes[hash_field_name(call.name)] = short_hash
        if missing:
            job.warnings.append(f"Lora not found: {', '.join(missing)}")
        if hashes:
            job.infotext_fields["Lora hashes"] = format_hashes(hashes)
        return job

    def _load(self, path: Path) -> LoraNetwork:
        stat = path.stat()
        version = (stat.st_mtime, stat.st_size)
        cached = self._parsed.get(path)
        if cached is not None and cached[0] == version:
            return cached[1]
        network = load_lora_file(path)
        self._parsed[path] = (version, network)
        while len(self._parsed) > LORA_FILES_IN_MEMORY:
            self._parsed.pop(next(iter(self._parsed)))
        return network
