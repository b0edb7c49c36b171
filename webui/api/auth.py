"""HTTP Basic authentication for the REST routes (A1111's --api-auth), compared in constant time, and who the
caller is (their jobs are the ones they may see and stop). Must not import torch, the engine or gradio."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPBasic, HTTPBasicCredentials

from webui.security import WRONG_CREDENTIALS, credentials_match


@dataclass(frozen=True, slots=True)
class Caller:
    """Who sent a request. Without any login (localhost only) everyone is `ANYONE` and may act on every job."""

    user: str | None
    admin: bool

    def may_act_on(self, owner: str | None) -> bool:
        """Whether this caller may see, interrupt, skip or cancel a job that `owner` submitted."""
        return self.admin or owner == self.user

    @property
    def jobs_of(self) -> str | None:
        """The owner whose jobs A1111's no-argument routes act on for this caller; None: anyone's."""
        return None if self.admin else self.user


ANYONE = Caller(user=None, admin=True)


def caller_of(request: Request) -> Caller:
    """The caller the router's auth dependency identified; ANYONE when the server has no login."""
    caller = getattr(request.state, "caller", None)
    return caller if isinstance(caller, Caller) else ANYONE


def basic_auth_dependency(credentials: Sequence[tuple[str, str]]) -> Callable[..., None]:
    """A FastAPI dependency that accepts any of `credentials` and answers 401 otherwise. The first user in the
    list is the admin, who may act on everyone's jobs; the others act on their own only."""
    allowed = tuple(credentials)
    admin = credentials[0][0] if credentials else None
    security = HTTPBasic(auto_error=False)

    def check(request: Request, given: HTTPBasicCredentials | None = Depends(security)) -> None:  # noqa: B008
        if given is not None and credentials_match(given.username, given.password, allowed):
            request.state.caller = Caller(user=given.username, admin=given.username == admin)
            return
        raise HTTPException(
            status_code=status.HTTP_401_UNAUTHORIZED,
            detail=WRONG_CREDENTIALS,
            headers={"WWW-Authenticate": "Basic"},
        )

    return check
