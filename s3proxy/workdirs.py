"""Directories owned by a live process: a lock file inside, held (flock) while the owner
lives. A crashed owner's directories are removed by the next process to look, and a live
one's never are: the lock, not a process id, tells (several processes, and containers
with their own pid spaces, may share one root)."""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile

LOCK = ".lock"


def make_locked_dir(root: str, prefix: str) -> tuple[str, int]:
    """A new directory under `root` and a descriptor holding its lock (close it, or exit,
    to give the directory up)."""
    directory = tempfile.mkdtemp(prefix=prefix, dir=root)
    lock = os.open(os.path.join(directory, LOCK), os.O_CREAT | os.O_RDWR, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)
    return directory, lock


def remove_if_unlocked(directory: str) -> None:
    try:
        lock = os.open(os.path.join(directory, LOCK), os.O_RDWR)
    except OSError:
        return  # not ours, or being made right now
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return  # a live owner holds it
    finally:
        os.close(lock)
    shutil.rmtree(directory, ignore_errors=True)


def remove_abandoned(root: str, prefix: str) -> None:
    """Every `prefix*` directory under `root` whose owner is gone."""
    try:
        names = os.listdir(root)
    except OSError:
        return
    for name in names:
        if name.startswith(prefix):
            remove_if_unlocked(os.path.join(root, name))
