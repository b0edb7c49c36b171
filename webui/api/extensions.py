"""REST routes for managing extensions (/api/v1/extensions: list, install, enable, disable, check, update, remove,
the index to install from), A1111's GET /sdapi/v1/extensions shape, and the boot id the page polls across a restart.
Must not import torch, webui.engine or gradio; the work is done by webui.app.extensions.ExtensionHost."""

from __future__ import annotations

import datetime
import uuid
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from webui.api.validation import JsonErrorRoute, require_unicode
from webui.app.extensions import (
    INDEX_URL_MAX_CHARACTERS,
    ExtensionAccessError,
    ExtensionError,
    ExtensionHost,
    ExtensionInfo,
    IndexEntry,
)
from webui.core.params import ParamError

PREFIX = "/api/v1/extensions"
# Paths extensions may not claim with their own REST routes (the program's own routes live there).
RESERVED_ROUTE_PREFIXES = ("/sdapi", "/api/", "/gradio_api", "/internal", "/config", "/login", "/logout",
                           "/file", "/assets", "/static", "/theme", "/docs", "/openapi", "/queue", "/upload")

Url = Annotated[str, Field(min_length=1, max_length=INDEX_URL_MAX_CHARACTERS), BeforeValidator(require_unicode)]
Branch = Annotated[str, Field(max_length=256), BeforeValidator(require_unicode)]
FolderName = Annotated[str, Field(max_length=64), BeforeValidator(require_unicode)]


class ExtensionItem(BaseModel):
    name: str
    title: str
    version: str
    description: str
    builtin: bool
    enabled: bool
    status: str
    error: str
    traceback: str
    remote: str
    branch: str
    commit: str
    commit_date: str
    requires: list[str]


class InstallRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: Url = Field(description="git URL (https, git, ssh or a local path)")
    branch: Branch = Field("", description="branch to check out; empty: the remote's default")
    folder: FolderName = Field("", description="folder name; empty: the manifest's name")


class EnableRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    install_requirements: bool = Field(False, description="consent to pip-install the manifest's requirements")


class IndexRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: Url = Field(description="http(s) URL of an index JSON in A1111's format; saved as the index once it loads")


class Message(BaseModel):
    message: str


class UpdateStatus(BaseModel):
    name: str
    status: str


class IndexItem(BaseModel):
    name: str
    url: str
    description: str
    tags: list[str]
    installed: bool


def index_items(entries: list[IndexEntry]) -> list[IndexItem]:
    return [IndexItem(name=e.name, url=e.url, description=e.description, tags=list(e.tags), installed=e.installed)
            for e in entries]


def item_of(info: ExtensionInfo) -> ExtensionItem:
    return ExtensionItem.model_validate(info, from_attributes=True)


def _unix_time(iso: str) -> int:
    try:
        return int(datetime.datetime.fromisoformat(iso).timestamp())
    except ValueError:
        return 0


def a1111_extension_list(host: ExtensionHost) -> list[dict[str, Any]]:
    """A1111's GET /sdapi/v1/extensions: [{name, remote, branch, commit_hash, commit_date, version, enabled}]."""
    return [
        {"name": info.name, "remote": info.remote or None, "branch": info.branch or None,
         "commit_hash": info.commit or None, "commit_date": _unix_time(info.commit_date) if info.commit_date else None,
         "version": info.version, "enabled": info.enabled}
        for info in host.list_extensions()
    ]


def boot_id_route() -> Callable[[], dict[str, str]]:
    """GET /internal/boot-id: a new value each time the process starts (the page reloads when it changes)."""
    boot_id = uuid.uuid4().hex

    async def boot_id_endpoint() -> dict[str, str]:
        return {"boot_id": boot_id}

    return boot_id_endpoint


async def _call(action: Callable[[], Any]) -> Any:
    """Run a (slow, git or pip) host action off the event loop; its refusals become HTTP errors."""
    try:
        return await run_in_threadpool(action)
    except ExtensionAccessError as error:
        raise HTTPException(403, str(error)) from None
    except ParamError as error:
        raise HTTPException(422, f"{error.field}: {error.reason}") from None
    except ExtensionError as error:
        status = 404 if str(error).startswith("no extension named") else 400
        raise HTTPException(status, str(error)) from None


def build_extensions_router(host: ExtensionHost) -> APIRouter:
    router = APIRouter(prefix=PREFIX, tags=["extensions"], route_class=JsonErrorRoute)

    @router.get("", response_model=list[ExtensionItem])
    async def list_extensions() -> list[ExtensionItem]:
        infos = await _call(host.list_extensions)
        return [item_of(info) for info in infos]

    @router.get("/index", response_model=list[IndexItem], summary="The extensions listed by the saved index URL")
    async def index() -> list[IndexItem]:
        # No URL parameter: a GET is something any web page can make the browser send, so it reads the index
        # the user chose and nothing else.
        return index_items(await _call(host.fetch_index))

    @router.post("/index", response_model=list[IndexItem], summary="Load an index from a URL and save the URL")
    async def load_index(request: IndexRequest) -> list[IndexItem]:
        return index_items(await _call(lambda: host.load_index(request.url)))

    @router.post("/install", response_model=Message)
    async def install(request: InstallRequest) -> Message:
        return Message(message=await _call(lambda: host.install(request.url, request.branch, request.folder)))

    @router.get("/{name}", response_model=ExtensionItem)
    async def get_extension(name: str) -> ExtensionItem:
        return item_of(await _call(lambda: host.get(name)))

    @router.post("/{name}/enable", response_model=Message)
    async def enable(name: str, request: EnableRequest | None = None) -> Message:
        consent = request.install_requirements if request is not None else False
        return Message(message=await _call(lambda: host.enable(name, consent)))

    @router.post("/{name}/disable", response_model=Message)
    async def disable(name: str) -> Message:
        return Message(message=await _call(lambda: host.disable(name)))

    @router.post("/{name}/check", response_model=UpdateStatus)
    async def check(name: str) -> UpdateStatus:
        return UpdateStatus(name=name, status=await _call(lambda: host.check_updates(name)))

    @router.post("/{name}/update", response_model=Message)
    async def update(name: str) -> Message:
        return Message(message=await _call(lambda: host.update(name)))

    @router.delete("/{name}", response_model=Message)
    async def remove(name: str) -> Message:
        return Message(message=await _call(lambda: host.remove(name)))

    return router
