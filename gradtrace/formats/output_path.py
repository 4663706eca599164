"""Whether a result can be written to a path, asked before the work that makes the result.

A hub diff may read a terabyte before it writes its JSON; finding only then that ``-o`` names a
folder, or a folder on a read-only file system, loses all of it. :func:`unwritable_reason` answers
up front by doing what the write will do — create a file in the nearest existing folder — and
removing it at once.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def unwritable_reason(path: str | os.PathLike) -> str | None:
    """Why a file cannot be written at ``path`` (missing folders would be created), or ``None`` if it can."""
    target = Path(path)
    if target.is_dir():
        return f"{target} is a folder, not a file"
    if target.exists() and not os.access(target, os.W_OK):
        return f"{target} is not writable"
    folder = target.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        return f"{folder} is not a folder, so {target} cannot be created in it"
    try:
        fd, probe = tempfile.mkstemp(prefix=".gradtrace-probe-", dir=folder)
    except OSError as err:
        return f"cannot create files in {folder} ({err.strerror or err})"
    os.close(fd)
    os.unlink(probe)
    return None
