"""Files and directories reclaimd creates: owner-only, whatever the process umask.

The journal says which VMs run and what operators asked of them, and the listen socket is a door
into the daemon: what reclaimd creates for them is 0600 in 0700 directories. Modes are set
explicitly after creation, so neither a permissive umask (0022 gives 0644 and 0755) nor an
over-strict one (0777 would leave the owner locked out) decides them. What exists already is
left as it is: an operator may have chosen other modes, or another owner, on purpose.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600


def make_dirs(path: Path, mode: int = PRIVATE_DIR) -> list[Path]:
    """Create ``path`` and its missing parents, each with ``mode``; returns those created.

    Raises OSError (as ``Path.mkdir``) when one cannot be created.
    """
    missing: list[Path] = []
    for directory in (path, *path.parents):
        if directory.exists():
            if not directory.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(directory))
            break
        missing.append(directory)
    created: list[Path] = []
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=mode)
        except FileExistsError:
            if not directory.is_dir():
                raise
            continue  # made meanwhile by someone else: theirs, left alone
        os.chmod(directory, mode)  # mkdir's mode passes through the umask
        created.append(directory)
    return created


def create_private(path: Path, mode: int = PRIVATE_FILE) -> bool:
    """Create the file ``path`` with ``mode`` unless it exists; True if it was created.

    Raises OSError when it cannot be created (its directory is missing or not writable).
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    except FileExistsError:
        return False
    try:
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
    return True
