"""Writing files so that a crash or an error never leaves a half-written file under the final name, and hashing them.
Standard library only; every layer that persists or checks files uses it."""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path

HASH_BLOCK_BYTES = 1024 * 1024


def write_file_atomically(final_path: Path, data: bytes) -> None:
    """Write `data` to `final_path` so that readers see the old file or the whole new one, never a part.

    A temp file in the same folder is written and fsynced, then renamed over `final_path`; on any
    failure the temp file is removed and the old file (if any) is untouched.
    """
    # The dot prefix keeps the temp name out of A1111's numbering scan and out of image listings.
    temp_path = final_path.with_name(f".{final_path.name}.{secrets.token_hex(4)}.tmp")
    # os.open with 0o666 lets the umask decide permissions, like a plain open() (mkstemp forces 0600).
    descriptor = os.open(temp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(descriptor, "wb") as stream:
            stream.write(data)
            stream.flush()
            # Without fsync a crash right after the rename can leave an empty file under the final name.
            os.fsync(stream.fileno())
        os.replace(temp_path, final_path)
    except BaseException:
        temp_path.unlink(missing_ok=True)
        raise


def sha256_of_file(path: Path) -> str:
    """The whole file's sha256, read block by block (A1111's model hash is its first 10 hex characters)."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(HASH_BLOCK_BYTES):
            digest.update(block)
    return digest.hexdigest()
