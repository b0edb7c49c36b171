"""How the REST routers check input and answer failures: bounded text types that refuse lone surrogates, echoed
input made JSON-safe and short, FastAPI's 422 body, and no bug ever a plain-text 500.
Must not import torch, webui.engine or gradio."""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from typing import Annotated, Any

from fastapi import Request, Response, status
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BeforeValidator, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from webui.core.params import MAX_NAME_CHARACTERS, MAX_PROMPT_CHARACTERS

logger = logging.getLogger(__name__)


def json_safe(value: Any) -> Any:
    """`value` with NaN and infinities as None and lone surrogates escaped: request fields are echoed back in
    answers and errors, and strict JSON (what the response encoder writes) has no spelling for either."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, str):
        # A lone surrogate ("\ud800" in the JSON) cannot be encoded as UTF-8 on the way back.
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, Mapping):
        return {json_safe(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def require_unicode(value: object) -> object:
    # JSON may carry lone surrogates ("\\ud800"); such text could never be saved, logged as UTF-8 or sent back.
    # Checked before pydantic's own string checks, whose message for them ("unable to parse raw data") says less.
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("must be valid Unicode text (no lone surrogates)") from None
    return value


# Request text types: a lone surrogate is refused with a 422 naming the field, and the length is checked as a
# string's ("at most N characters"; a limit added on top of a validated type would count "items").
PromptText = Annotated[str, Field(max_length=MAX_PROMPT_CHARACTERS), BeforeValidator(require_unicode)]
Name = Annotated[str, Field(max_length=MAX_NAME_CHARACTERS), BeforeValidator(require_unicode)]
NonEmptyName = Annotated[str, Field(min_length=1, max_length=MAX_NAME_CHARACTERS), BeforeValidator(require_unicode)]
# Echoed input is cut to this: a refused 10 MB prompt must not come back in the error.
ECHOED_INPUT_CHARACTERS = 200


def _cut_echoed_input(errors: list[Any]) -> list[Any]:
    for error in errors:
        if isinstance(error, dict):
            echoed = error.get("input")
            if isinstance(echoed, bytes):
                echoed = error["input"] = echoed.decode("utf-8", "backslashreplace")
            if isinstance(echoed, str) and len(echoed) > ECHOED_INPUT_CHARACTERS:
                error["input"] = echoed[:ECHOED_INPUT_CHARACTERS] + "…"
            elif isinstance(echoed, (list, dict)) and len(echoed) > ECHOED_INPUT_CHARACTERS:
                error["input"] = f"({len(echoed)} items)"
    return errors


def validation_error_response(error: RequestValidationError) -> JSONResponse:
    """FastAPI's own 422 body (loc, msg, type, input), with the echoed input made JSON-safe."""
    detail = json_safe(jsonable_encoder(_cut_echoed_input([dict(item) for item in error.errors()])))
    return JSONResponse({"detail": detail}, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)


class JsonErrorRoute(APIRoute):
    """Validation errors answered as JSON even when the input holds NaN or a lone surrogate (FastAPI's own 422
    echoes the input and would fail to encode it: a 500), and an unexpected error as a JSON 500 that is logged.

    Exception handlers belong to the app, which main.py owns; a route class travels with its router.
    """

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as error:
                return validation_error_response(error)
            except StarletteHTTPException:
                raise
            except Exception as error:  # a bug must answer JSON and leave the server running
                logger.exception("%s %s failed", request.method, request.url.path)
                return JSONResponse({"detail": str(error) or type(error).__name__},
                                    status_code=status.HTTP_500_INTERNAL_SERVER_ERROR)

        return handle
