"""Textual-inversion embeddings as A1111 finds and uses them: files under the embeddings folders (.safetensors, and
.pt/.bin through torch.load(weights_only=True) only), fit to the loaded family, and the token-id lookup prompts use.
Must not import gradio, fastapi or webui.app; never unpickles anything beyond plain tensors and containers."""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

import torch

from webui.core.files import sha256_of_file
from webui.engine.clip_tokenizer import ClipTokenizer
from webui.engine.families import Family

if TYPE_CHECKING:
    from webui.engine.model_manager import LoadedModel

logger = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".pt", ".bin")
SAFETENSORS_SUFFIX = ".safetensors"
EMBEDDING_SUFFIXES = (*PICKLE_SUFFIXES, SAFETENSORS_SUFFIX)
SDXL_KEYS = ("clip_l", "clip_g")
# The single tensor of an SD 1.x / SD 2.x embedding (TextEncoderSpec.ti_key None).
SINGLE = None
# An embedding must fit in one 75-token chunk: A1111 never splits one across chunks.
MAX_VECTORS = 75
SHORT_HASH_LENGTH = 12
# torch's refusal names the global it would have had to import and call, e.g. "GLOBAL posix.mkdir" or
# "GLOBAL torch.nn.modules.container.ParameterDict"; its wording differs between cases and torch versions.
_REFUSED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
_REFUSED_OPERATION = re.compile(r"Unsupported operand \d+")


class EmbeddingError(ValueError):
    """A file in the embeddings folder that is not a usable embedding; the message says why."""


@dataclass(frozen=True, eq=False)
class Embedding:
    """One embedding file: `tensors` TI key → (vectors, width) float32 on the CPU (key None: the one tensor of an
    SD 1.x/2.x embedding; "clip_l"/"clip_g": SDXL's). `shape` and `vectors` are what A1111's API reports: the
    width (SDXL: both widths added) and the number of vectors, i.e. prompt tokens it takes."""

    name: str
    path: Path
    tensors: Mapping[str | None, torch.Tensor]
    step: int | None
    sd_checkpoint: str | None
    sd_checkpoint_name: str | None
    short_hash: str

    @property
    def shape(self) -> int:
        return sum(int(tensor.shape[1]) for tensor in self.tensors.values())

    @property
    def vectors(self) -> int:
        # SDXL: A1111 counts clip_g's rows; both tensors are checked to have the same number.
        return int(next(iter(self.tensors.values())).shape[0])

    def vectors_for(self, ti_key: str | None) -> torch.Tensor:
        """The (vectors, width) tensor a text encoder with this TI key takes."""
        return self.tensors[ti_key]

    def misfit(self, widths: Mapping[str | None, int]) -> str | None:
        """Why this embedding cannot be used with encoders of these widths (TI key → width), or None if it can."""
        actual = {key: int(tensor.shape[1]) for key, tensor in self.tensors.items()}
        if actual == dict(widths):
            return None
        return f"shape {self.shape} ({_describe(actual)}), the model takes {_describe(widths)}"

    def api_fields(self) -> dict[str, object]:
        """The fields of A1111's GET /sdapi/v1/embeddings entry."""
        return {
            "step": self.step,
            "sd_checkpoint": self.sd_checkpoint,
            "sd_checkpoint_name": self.sd_checkpoint_name,
            "shape": self.shape,
            "vectors": self.vectors,
        }


def _describe(widths: Mapping[str | None, int]) -> str:
    return " + ".join(f"{key} {width}" if key is not None else str(width) for key, width in widths.items())


# -- reading one file -------------------------------------------------------------------------------------------


def read_embedding_file(path: Path, short_hash: str) -> Embedding:
    """The embedding in one file (A1111's create_embedding_from_data), or EmbeddingError saying why not."""
    if path.suffix.lower() == SAFETENSORS_SUFFIX:
        data: object = _read_safetensors(path)
    else:
        data = _read_pickle(path)
    if not isinstance(data, dict):
        raise EmbeddingError(f"holds a {type(data).__name__}, not an embedding")
    tensors: dict[str | None, torch.Tensor]
    if "string_to_param" in data:
        # A1111's own format: {"string_to_token", "string_to_param": {"*": tensor}, "name", "step", ...}.
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise EmbeddingError("string_to_param must hold exactly one tensor")
        tensors = {SINGLE: _vector_tensor(next(iter(params.values())), "string_to_param")}
    elif all(key in data for key in SDXL_KEYS):
        tensors = {key: _vector_tensor(data[key], key) for key in SDXL_KEYS}
        if len({tensor.shape[0] for tensor in tensors.values()}) != 1:
            raise EmbeddingError("clip_l and clip_g have different numbers of vectors")
    elif len(data) == 1 and isinstance(next(iter(data.values())), torch.Tensor):
        # kohya's {"emb_params": (n, dim)}, diffusers' learned_embeds {token: (dim,)}.
        (key, tensor), = data.items()
        tensors = {SINGLE: _vector_tensor(tensor, str(key))}
    else:
        raise EmbeddingError("neither a textual-inversion embedding nor a diffusers concept (unknown keys "
                             f"{sorted(str(key) for key in data)[:5]})")
    count = next(iter(tensors.values())).shape[0]
    if not 1 <= count <= MAX_VECTORS:
        raise EmbeddingError(f"{count} vectors; an embedding must have 1 to {MAX_VECTORS} to fit in a prompt chunk")
    step = data.get("step")
    return Embedding(
        name=path.stem,
        path=path,
        tensors=MappingProxyType(tensors),
        step=step if isinstance(step, int) and not isinstance(step, bool) else None,
        sd_checkpoint=_text_or_none(data.get("sd_checkpoint")),
        sd_checkpoint_name=_text_or_none(data.get("sd_checkpoint_name")),
        short_hash=short_hash,
    )


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as file:
            keys = list(file.keys())
            # Look at the keys before reading: a checkpoint dropped in the wrong folder is not read into memory.
            if not (len(keys) == 1 or all(key in keys for key in SDXL_KEYS)):
                raise EmbeddingError(f"{len(keys)} tensors (e.g. {sorted(keys)[:3]}): not an embedding")
            wanted = SDXL_KEYS if len(keys) != 1 else keys
            return {key: file.get_tensor(key) for key in wanted}
    except SafetensorError as error:
        raise EmbeddingError(f"not a readable safetensors file ({error})") from None


def _read_pickle(path: Path) -> object:
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        message = str(error)
        if (found := _REFUSED_GLOBAL.search(message)) is not None:
            detail = f"it refers to {found.group(1)}, which is not a tensor or plain container"
        elif (operation := _REFUSED_OPERATION.search(message)) is not None:
            detail = operation.group(0).lower()
        else:
            detail = message.splitlines()[0]
        raise EmbeddingError(
            f"refused: torch.load(weights_only=True) cannot read it ({detail}); loading it would need full "
            "unpickling, which can run code from the file. Re-save it as .safetensors on a machine you trust"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise EmbeddingError(f"not a readable torch file ({error})") from None


def _vector_tensor(value: object, what: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        raise EmbeddingError(f"{what} is not a floating-point tensor")
    tensor = value.detach().to("cpu", torch.float32)
    if tensor.ndim == 1:
        tensor = tensor.unsqueeze(0)
    if tensor.ndim != 2:
        raise EmbeddingError(f"{what} has shape {tuple(tensor.shape)}, expected (vectors, width)")
    return tensor.contiguous()


def _text_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


# -- matching in prompts ----------------------------------------------------------------------------------------


class EmbeddingLookup:
    """The usable embeddings by CLIP token ids of their names (A1111's ids_lookup): longest name first, so that
    "style-v2" wins over "style" where both match."""

    def __init__(self, embeddings: Iterable[Embedding], tokenizer: ClipTokenizer) -> None:
        self.embeddings: Mapping[str, Embedding] = MappingProxyType({item.name: item for item in embeddings})
        by_first_id: dict[int, list[tuple[tuple[int, ...], Embedding]]] = {}
        for embedding in self.embeddings.values():
            ids = tuple(tokenizer.encode(embedding.name))
            if ids:
                by_first_id.setdefault(ids[0], []).append((ids, embedding))
        for candidates in by_first_id.values():
            candidates.sort(key=lambda candidate: len(candidate[0]), reverse=True)
        self._by_first_id = by_first_id

    def match(self, tokens: Sequence[int], position: int) -> tuple[Embedding, int] | None:
        """The embedding whose name's ids start at `tokens[position]`, and how many ids the name takes."""
        for ids, embedding in self._by_first_id.get(tokens[position], ()):
            if tuple(tokens[position : position + len(ids)]) == ids:
                return embedding, len(ids)
        return None

    def __len__(self) -> int:
        return len(self.embeddings)


# -- the folders --------------------------------------------------------------------------------------------------

FileVersion = tuple[int, int]  # (mtime_ns, size)
FitKey = tuple[Family, tuple[tuple[str | None, int], ...]]


@dataclass(frozen=True)
class _Split:
    """One refresh's result, swapped in whole so that readers never see half of it."""

    loaded: Mapping[str, Embedding]
    skipped: Mapping[str, Embedding]
    skip_notes: Mapping[str, str]
    errors: Mapping[str, str]
    lookup: EmbeddingLookup | None


class EmbeddingDatabase:
    """The embeddings under `roots` (A1111's --embeddings-dir, searched recursively, links followed).

    `loaded`: name → embedding usable with the family of the last refresh, sorted by name; `skipped`: the
    others, with `skip_notes[name]` saying why; `errors`: file name → why the file is not an embedding.
    A file is read (and hashed) once per version (mtime, size).
    """

    def __init__(self, roots: Sequence[Path]) -> None:
        self.roots = [Path(root) for root in roots]
        self._lock = threading.Lock()
        self._split = _Split(MappingProxyType({}), MappingProxyType({}), MappingProxyType({}), MappingProxyType({}),
                             None)
        self._files: dict[Path, tuple[FileVersion, Embedding | str]] = {}
        self._scanned: list[Embedding] = []
        self._scan_errors: dict[str, str] = {}
        self._root_versions: dict[Path, int | None] | None = None
        self._fitted_for: FitKey | None = None

    @property
    def loaded(self) -> Mapping[str, Embedding]:
        return self._split.loaded

    @property
    def skipped(self) -> Mapping[str, Embedding]:
        return self._split.skipped

    @property
    def skip_notes(self) -> Mapping[str, str]:
        return self._split.skip_notes

    @property
    def errors(self) -> Mapping[str, str]:
        return self._split.errors

    @property
    def lookup(self) -> EmbeddingLookup | None:
        """What tokenize_prompt matches against: the loaded embeddings; None before the first refresh."""
        return self._split.lookup

    def refresh(self, family: Family, tokenizer: ClipTokenizer, widths: Mapping[str | None, int] | None = None) -> None:
        """Scan the folders now (A1111: on model load and /sdapi/v1/refresh-embeddings) and fit them to `family`.

        `widths` (TI key → width, Family.embedding_widths of the loaded encoders) defaults to the full-size
        family's; a model narrower than the real one (tests) passes its own.
        """
        with self._lock:
            self._scan()
            self._fit(family, tokenizer, widths)

    def refresh_if_changed(
        self, family: Family, tokenizer: ClipTokenizer, widths: Mapping[str | None, int] | None = None
    ) -> bool:
        """A1111's per-job check: rescan only when a top folder's mtime changed (edits inside subfolders may be
        missed, as in A1111); refit when the family or widths changed. True when anything was redone."""
        with self._lock:
            rescan = self._root_versions != self._current_root_versions()
            if rescan:
                self._scan()
            if rescan or self._fitted_for != _fit_key(family, widths):
                self._fit(family, tokenizer, widths)
                return True
            return False

    def refresh_for_model(self, model: LoadedModel, *, force: bool = False) -> bool:
        """`refresh` (force: on model load, the refresh route) or `refresh_if_changed` (each job) for a loaded
        model: its family, tokenizer and the widths of its own text encoders. True when anything was redone."""
        widths = model.family.embedding_widths(model.components.modules())
        if force:
            self.refresh(model.family, model.tokenizer, widths)
            return True
        return self.refresh_if_changed(model.family, model.tokenizer, widths)

    def _current_root_versions(self) -> dict[Path, int | None]:
        versions: dict[Path, int | None] = {}
        for root in self.roots:
            try:
                versions[root] = root.stat().st_mtime_ns
            except OSError:
                versions[root] = None
        return versions

    def _scan(self) -> None:
        self._root_versions = self._current_root_versions()
        seen: dict[Path, tuple[FileVersion, Embedding | str]] = {}
        found: dict[str, Embedding] = {}
        errors: dict[str, str] = {}
        for path in self._embedding_files():
            try:
                stat = path.stat()
            except OSError:
                continue
            if stat.st_size == 0:
                continue  # A1111 skips empty files (a download still being written, a placeholder)
            version = (stat.st_mtime_ns, stat.st_size)
            cached = self._files.get(path)
            result = cached[1] if cached is not None and cached[0] == version else self._read(path)
            seen[path] = (version, result)
            if isinstance(result, str):
                errors[path.name] = result
            else:
                # The same name in two folders: the later file wins, as in A1111.
                found[result.name] = result
        self._files = seen
        self._scanned = sorted(found.values(), key=lambda embedding: embedding.name.lower())
        self._scan_errors = errors
        self._fitted_for = None

    def _read(self, path: Path) -> Embedding | str:
        try:
            return read_embedding_file(path, sha256_of_file(path)[:SHORT_HASH_LENGTH])
        except EmbeddingError as error:
            logger.warning("textual inversion: %s: %s", path.name, error)
            return str(error)
        except OSError as error:
            logger.warning("textual inversion: %s: cannot read (%s)", path.name, error)
            return f"cannot read ({error})"

    def _embedding_files(self) -> list[Path]:
        files: list[Path] = []
        for root in self.roots:
            if not root.is_dir():
                continue
            for directory, subdirectories, names in os.walk(root, followlinks=True):
                subdirectories.sort()
                for name in sorted(names):
                    if name.lower().endswith(EMBEDDING_SUFFIXES):
                        files.append(Path(directory) / name)
        return files

    def _fit(self, family: Family, tokenizer: ClipTokenizer, widths: Mapping[str | None, int] | None) -> None:
        expected = dict(widths) if widths is not None else family.embedding_widths()
        loaded: dict[str, Embedding] = {}
        skipped: dict[str, Embedding] = {}
        notes: dict[str, str] = {}
        for embedding in self._scanned:
            misfit = embedding.misfit(expected)
            if misfit is None:
                loaded[embedding.name] = embedding
            else:
                skipped[embedding.name] = embedding
                notes[embedding.name] = f"made for another model family than {family.label}: {misfit}"
        self._split = _Split(
            MappingProxyType(loaded), MappingProxyType(skipped), MappingProxyType(notes),
            MappingProxyType(dict(self._scan_errors)), EmbeddingLookup(loaded.values(), tokenizer),
        )
        self._fitted_for = _fit_key(family, widths)


def _fit_key(family: Family, widths: Mapping[str | None, int] | None) -> FitKey:
    # The tokenizer is not part of it: every family shares the one CLIP vocabulary.
    expected = dict(widths) if widths is not None else family.embedding_widths()
    return family, tuple(expected.items())
