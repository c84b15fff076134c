"""Atomic writes: a file or a folder appears whole under its final name, or not at all.

A failure (full disk, kill, exception) leaves the previous version or nothing, never a partial
one. Both write to a temporary sibling on the same file system and rename it into place. What they
write gets the usual mode (0o666 & ~umask for files, 0o777 & ~umask for folders), not the private one
of temporary files: safetensors 0.8 and `mkstemp` write 0600, which another account (a server) cannot read.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

from safetensors import SafetensorError

Owned = Callable[[PurePosixPath], bool]
"""Whether a path inside a folder (relative to it) is the writer's own: its next write replaces or removes it."""
_LEFTOVERS = (".*.tmp-*", ".*.old-*")  # temporary siblings made here: never a user's file


@contextmanager
def atomic_folder(
    target: str | Path, owned: Owned | None = None, note: Callable[[str], None] | None = None
) -> Iterator[Path]:
    """Yields an empty temporary sibling of `target`; on success it takes `target`'s place.

    Without `owned` the whole folder is replaced. With it, whatever the old folder holds that the new one does
    not write and that `owned` does not claim (a user's notes, a report written beside an export) is carried
    over: hard-linked (copied across file systems) into the temporary folder before the swap, so the old folder
    is untouched until then and a failure or kill at any point loses no file. `note` gets one line naming what
    was kept. The old folder is moved aside, the new one renamed in, then the old one removed: between the two
    renames (microseconds) neither exists; a kill there is undone by the next write (`_restore`), and a reader
    never sees a mix of old and new files.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _restore(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        _share_tree(tmp)  # before the carry-over: a kept file keeps its own mode
        kept = []
        if owned is not None and _is_dir(target):
            shutil.copymode(target, tmp)  # a folder the user made private stays private
            kept = _carry_over(target, tmp, owned)
        _fsync_tree(tmp)
        _swap(tmp, target)
        _remove_leftovers(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if kept and note is not None:
        shown = ", ".join(kept[:8]) + (f" and {len(kept) - 8} more" if len(kept) > 8 else "")
        note(f"{target}: kept {len(kept)} file(s) this write does not own: {shown}")


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
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp (and safetensors) make it private; the file gets the usual mode
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class WriteError(OSError):
    """A failed write, as one line: the path, the reason (`strerror`) and that the previous version is unchanged."""

    def __str__(self) -> str:
        return (
            f"cannot write {self.filename} ({self.strerror}); any previous version is unchanged: free space there "
            "or write elsewhere"
        )


@contextmanager
def write_errors(path: str | Path) -> Iterator[None]:
    """A failed write under it (a full disk: OSError from Python, SafetensorError from safetensors' writer) becomes
    a `WriteError` naming `path`; an atomic write under it has left any previous version as it was."""
    try:
        yield
    except WriteError:
        raise
    except (OSError, SafetensorError) as err:
        text = " ".join(str(err).split())
        found = re.search(r'message: "([^"]+)"', text)  # safetensors: IoError(Os { code: 28, ..., message: "..." })
        code = re.search(r"code: (\d+)", text)
        reason = getattr(err, "strerror", None) or (found.group(1) if found else text)
        errno = getattr(err, "errno", None) or (int(code.group(1)) if code else 0)
        raise WriteError(errno, reason, str(path)) from None


def owned_names(patterns: dict[str, tuple[str, ...] | None]) -> Owned:
    """An `Owned` from {top-level name pattern: None (owned whole) or the patterns owned inside that folder}.

    A folder given inner patterns is merged: its owned entries are replaced, the rest (a user's file) kept.
    """

    def owned(path: PurePosixPath) -> bool:
        for pattern, inner in patterns.items():
            if fnmatch.fnmatchcase(path.parts[0], pattern):
                if inner is None:
                    return True
                return len(path.parts) > 1 and any(fnmatch.fnmatchcase(path.parts[1], p) for p in inner)
        return False

    return owned


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


def _swap(tmp: Path, target: Path) -> None:
    """Renames `tmp` to `target`, the old `target` moved aside first and removed after; put back on a failure."""
    old = None
    if target.exists() or target.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent)) / target.name
        os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        if old is not None:
            os.rename(old, target)
        raise
    if old is not None:
        shutil.rmtree(old.parent, ignore_errors=True)


def _restore(target: Path) -> None:
    """A kill between `_swap`'s two renames leaves no `target` and the previous one in `.name.old-*/name`: that
    previous folder (it holds any kept user file) is put back before anything else happens."""
    if target.exists() or target.is_symlink():
        return
    previous = sorted(target.parent.glob(f".{target.name}.old-*/{target.name}"), key=lambda p: p.lstat().st_mtime)
    if previous:
        os.rename(previous[-1], target)


def _carry_over(old: Path, new: Path, owned: Owned, rel: PurePosixPath | None = None) -> list[str]:
    """Links into `new` every entry of `old` that `new` lacks and `owned` does not claim; returns their paths."""
    kept: list[str] = []
    for entry in sorted(old.iterdir()):
        path, dest = (rel or PurePosixPath()) / entry.name, new / entry.name
        if owned(path) or any(fnmatch.fnmatchcase(entry.name, p) for p in _LEFTOVERS):
            continue  # the writer's own: its new version (if it wrote one) wins, a stale one goes
        if _is_dir(entry):
            made = not (dest.exists() or dest.is_symlink())
            if made:
                dest.mkdir()
                shutil.copystat(entry, dest)
            elif not _is_dir(dest):
                continue
            inner = _carry_over(entry, dest, owned, path)
            if made and not inner:
                dest.rmdir()
            kept += inner
        elif not (dest.exists() or dest.is_symlink()):
            _link(entry, dest)
            kept.append(str(path))
    return kept


def _link(src: Path, dest: Path) -> None:
    """`dest` becomes `src`: a hard link (the same bytes, nothing copied), a copy across file systems."""
    if src.is_symlink():
        os.symlink(os.readlink(src), dest)
        return
    try:
        os.link(src, dest, follow_symlinks=False)
    except OSError:
        if not src.is_file():
            raise
        shutil.copy2(src, dest)


def _is_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def _remove_leftovers(target: Path) -> None:
    """Temporary siblings of `target` that a killed writer left (a SIGKILL runs no cleanup): superseded now that
    `target` is whole. With `include_model` each one holds a copy of the model's weights."""
    for pattern in (f".{target.name}.tmp-*", f".{target.name}.old-*"):
        for leftover in target.parent.glob(pattern):
            shutil.rmtree(leftover, ignore_errors=True)


def _share_tree(folder: Path) -> None:
    """The usual modes on `folder` and what was written in it (mkdtemp, mkstemp and safetensors make them private)."""
    mask = _umask()
    os.chmod(folder, 0o777 & ~mask)
    for path in folder.rglob("*"):
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
