"""HTTP Basic authentication for the REST routes (A1111's --api-auth), compared in constant time.
Must not import torch, the engine or gradio."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence

from fastapi import Depends, HTTPException, status
from fastapi.security import HTTPBasic, HTTPBasicCredentials


def basic_auth_dependency(credentials: Sequence[tuple[str, str]]) -> Callable[..., None]:
    """A FastAPI dependency that accepts any of `credentials` and answers 401 otherwise."""
    allowed = [(user.encode(), password.encode()) for user, password in credentials]
    security = HTTPBasic(auto_error=False)

    def check(given: HTTPBasicCredentials | None = Depends(security)) -> None:  # noqa: B008 - FastAPI idiom
        if given is not None:
            user, password = given.username.encode(), given.password.encode()
            # Every pair is compared, so the time taken does not reveal which user exists.
            matches = [secrets.compare_digest(user, u) & secrets.compare_digest(password, p) for u, p in allowed]
            if any(matches):
                return
        raise HTTPException(
            status_code=status.HTTP_401_UNAUTHORIZED,
            detail="Incorrect username or password",
            headers={"WWW-Authenticate": "Basic"},
        )

    return check
