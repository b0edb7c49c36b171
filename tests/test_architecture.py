"""The layer rules of ARCHITECTURE.md, checked by walking every module's imports with ast.
Imports nothing from webui (it reads the source only)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "webui"
STDLIB = set(sys.stdlib_module_names)

# layer → imports it must never make (top-level package or webui sub-package prefixes)
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "webui.core": ("webui.engine", "webui.app", "webui.ui", "webui.api", "webui.main", "webui.cli"),
    "webui.engine": ("gradio", "fastapi", "webui.app", "webui.ui", "webui.api", "webui.main", "webui.cli"),
    "webui.app": ("gradio", "fastapi", "webui.ui", "webui.api", "webui.main", "webui.cli"),
    "webui.ui": ("torch", "diffusers", "transformers", "webui.engine", "webui.api", "webui.main", "webui.cli"),
    # The access gate wraps any ASGI app: standard library only, no web framework.
    "webui.security": ("gradio", "fastapi", "starlette", "torch", "webui.engine", "webui.app", "webui.ui",
                       "webui.api", "webui.main", "webui.cli"),
    # The tunnel: gradio's frpc and tunnel-request only (imported inside functions), nothing of the app.
    "webui.share": ("torch", "diffusers", "transformers", "fastapi", "webui.engine", "webui.app", "webui.ui",
                    "webui.api", "webui.main", "webui.cli"),
}


def module_name(path: Path) -> str:
    relative = path.relative_to(ROOT).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_layers_only_import_downwards(path: Path) -> None:
    name = module_name(path)
    for layer, forbidden in FORBIDDEN.items():
        if name == layer or name.startswith(layer + "."):
            for imported in imported_modules(path):
                assert not any(imported == bad or imported.startswith(bad + ".") for bad in forbidden), (
                    f"{name} imports {imported}, which {layer} must not import"
                )


@pytest.mark.parametrize(
    "path", [p for p in MODULES if module_name(p).startswith("webui.core")], ids=lambda p: p.name
)
def test_core_uses_only_the_standard_library(path: Path) -> None:
    for imported in imported_modules(path):
        top = imported.split(".")[0]
        assert top in STDLIB or imported.startswith("webui.core") or top == "__future__", (
            f"{module_name(path)} imports {imported}; webui.core may import only the standard library"
        )


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_module_starts_with_a_docstring(path: Path) -> None:
    docstring = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
    assert docstring, f"{path.relative_to(ROOT)} has no module docstring"
    assert len(docstring.strip().splitlines()) >= 2, f"{path.relative_to(ROOT)}: docstring must say what it owns and must not import"


EXTENSION_FILES = sorted((ROOT / "extensions").rglob("*.py"))


@pytest.mark.parametrize("path", EXTENSION_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_extensions_import_only_the_extension_api(path: Path) -> None:
    for imported in imported_modules(path):
        if imported == "webui" or imported.startswith("webui."):
            assert imported == "webui.extension_api", (
                f"{path.relative_to(ROOT)} imports {imported}; extensions may import only webui.extension_api"
            )


def test_the_extension_api_imports_only_core() -> None:
    path = PACKAGE / "extension_api.py"
    for imported in imported_modules(path):
        if imported.startswith("webui."):
            assert imported.startswith("webui.core."), (
                f"webui.extension_api imports {imported}; the public surface may rest on webui.core only"
            )
