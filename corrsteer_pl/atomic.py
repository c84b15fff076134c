"""Atomic writes: a file or a folder appears whole under its final name, or not at all.

A failure (full disk, kill, exception) leaves the previous version or nothing, never a partial
one. Both write to a temporary sibling on the same file system and rename it into place.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_folder(target: str | Path) -> Iterator[Path]:
    """Yields an empty temporary sibling of `target`; on success it replaces `target` whole.

    The old folder is moved aside, the new one renamed in, then the old one removed: between the
    two renames (microseconds) neither exists, but a reader never sees a mix of old and new files.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the export gets a folder's usual mode
    try:
        yield tmp
        _fsync_tree(tmp)
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.rename(target, old / target.name)
        os.rename(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        _remove_leftovers(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_file(target: str | Path) -> Iterator[Path]:
    """Yields a temporary sibling path of `target` to write; on success it replaces `target`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; the file gets the usual mode
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_writable(folder: str | Path, flag: str) -> None:
    """Fails with one line naming `flag` unless files can be created next to (or in) `folder`."""
    folder = Path(folder)
    parent = folder if folder.is_dir() else folder.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{flag}: {folder} exists and is not a folder: choose another path")
    try:
        fd, name = tempfile.mkstemp(prefix=".corrsteer-write-check-", dir=parent)
        os.close(fd)
        os.unlink(name)
    except OSError as err:
        raise ValueError(f"{flag}: cannot write under {parent} ({err.strerror}): choose a writable folder") from None


def _remove_leftovers(target: Path) -> None:
    """Temporary siblings of `target` that a killed writer left (a SIGKILL runs no cleanup): superseded now that
    `target` is whole. With `include_model` each one holds a copy of the model's weights."""
    for pattern in (f".{target.name}.tmp-*", f".{target.name}.old-*"):
        for leftover in target.parent.glob(pattern):
            shutil.rmtree(leftover, ignore_errors=True)


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
