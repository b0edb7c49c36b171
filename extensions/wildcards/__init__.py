"""Wildcards: `__name__` in a prompt becomes one line of `name.txt`, picked by a random.Random seeded with the job's
seed, so the same seed gives the same prompt. Imports only webui.extension_api (and the standard library).

Files come from this extension's `wildcards/` folder and from a user folder (setting; default <data dir>/wildcards),
the user's file winning; `__animals/cats__` reads `animals/cats.txt`. A picked line may hold wildcards itself.
The original prompt is written to the infotext as "Template" (and "Negative Template"), as A1111's Dynamic Prompts
does; pasting such an infotext puts the template back into the prompt, so seed + template remake the image.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

from webui.extension_api import (
    BeforeGenerationContext,
    ExtensionAPI,
    HookPoint,
    InfotextPastedContext,
    Textbox,
)

WILDCARD = re.compile(r"__([A-Za-z0-9_\-/ ]+?)__")
TEMPLATE_KEY = "Template"
NEGATIVE_TEMPLATE_KEY = "Negative Template"
# Nested wildcards are expanded this many rounds at most (a file naming itself must not loop forever).
MAX_DEPTH = 10


class WildcardFiles:
    """The wildcard files of the shipped folder and of the user folder (user first)."""

    def __init__(self, folders: list[Path]) -> None:
        self.folders = folders

    def lines(self, name: str) -> list[str] | None:
        for folder in self.folders:
            path = (folder / f"{name.strip()}.txt").resolve()
            if not path.is_relative_to(folder.resolve()) or not path.is_file():
                continue
            text = path.read_text(encoding="utf-8", errors="replace")
            return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        return None

    def names(self) -> list[str]:
        found: set[str] = set()
        for folder in self.folders:
            if folder.is_dir():
                found.update(path.relative_to(folder).with_suffix("").as_posix() for path in folder.rglob("*.txt"))
        return sorted(found)


def expand(text: str, files: WildcardFiles, rng: random.Random) -> str:
    """Every known `__name__` replaced, left to right, by a line drawn with `rng`; unknown names stay as written."""
    for _ in range(MAX_DEPTH):
        def pick(match: re.Match[str]) -> str:
            lines = files.lines(match.group(1))
            return rng.choice(lines) if lines else match.group(0)

        expanded = WILDCARD.sub(pick, text)
        if expanded == text:
            break
        text = expanded
    return text


def setup(api: ExtensionAPI) -> None:
    api.add_setting(Textbox("user_folder", "Wildcards: extra folder of .txt files (empty: <data dir>/wildcards)"))

    def files() -> WildcardFiles:
        user_folder = str(api.setting("user_folder")).strip()
        return WildcardFiles([Path(user_folder) if user_folder else api.data_dir / "wildcards",
                              api.directory / "wildcards"])

    def before_generation(context: BeforeGenerationContext) -> None:
        params = context.params
        if not WILDCARD.search(params.prompt) and not WILDCARD.search(params.negative_prompt):
            return
        rng = random.Random(context.seed)
        wildcard_files = files()
        prompt = expand(params.prompt, wildcard_files, rng)
        negative_prompt = expand(params.negative_prompt, wildcard_files, rng)
        if prompt != params.prompt:
            context.infotext_fields[TEMPLATE_KEY] = params.prompt
        if negative_prompt != params.negative_prompt:
            context.infotext_fields[NEGATIVE_TEMPLATE_KEY] = params.negative_prompt
        context.params = params.replace(prompt=prompt, negative_prompt=negative_prompt)

    def infotext_pasted(context: InfotextPastedContext) -> None:
        if TEMPLATE_KEY in context.fields:
            context.prompt = context.fields[TEMPLATE_KEY]
        if NEGATIVE_TEMPLATE_KEY in context.fields:
            context.negative_prompt = context.fields[NEGATIVE_TEMPLATE_KEY]

    def build_tab() -> None:
        import gradio as gr  # the tab is built by the web UI, which has gradio loaded

        def listing() -> str:
            names = files().names()
            return "\n".join(f"- `__{name}__`" for name in names) or "No wildcard files found."

        gr.Markdown("Write `__name__` in a prompt to draw a line of `name.txt`. Files found:")
        shown = gr.Markdown(listing(), elem_id="wildcards_list")
        gr.Button("Refresh", elem_id="wildcards_refresh").click(listing, outputs=shown, api_name=False)

    api.on(HookPoint.BEFORE_GENERATION, before_generation)
    api.on(HookPoint.INFOTEXT_PASTED, infotext_pasted)
    api.add_tab("Wildcards", build_tab)
