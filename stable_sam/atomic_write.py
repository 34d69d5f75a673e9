"""Atomic file writes: a temporary file in the target's folder, then one rename.

A reader never sees a half-written file: it finds the old version or the new one. The temporary
file is created the way ``open(path, "w")`` creates a file (``os.open`` with mode 0o666, which the
kernel narrows by the umask and the folder's default ACL), not with ``tempfile.mkstemp``, whose
0600 would stay on the output and hide a checkpoint or a metrics file from the other users of a
shared storage.

:func:`atomic_open` replaces one file. :class:`AtomicFileSet` replaces several files together
(a stage's outputs): every new version is written first, and the renames come last.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["AtomicFileSet", "atomic_open", "write_bytes_atomic", "write_text_atomic"]


def _create_temporary(path: Path) -> tuple[int, Path]:
    """A new, empty sibling of ``path`` (unique name; mode 0o666 & ~umask, like ``open``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    return os.open(tmp, flags, 0o666), tmp


@contextlib.contextmanager
def _write_temporary(path: Path, mode: str, fsync: bool, **kwargs: Any) -> Iterator[tuple[IO, Path]]:
    fd, tmp = _create_temporary(path)
    try:
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f, tmp
            if fsync:
                f.flush()
                os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_open(
    path: str | os.PathLike, mode: str = "wb", *, fsync: bool = True, **kwargs: Any
) -> Iterator[IO]:
    """Open a temporary sibling of ``path`` for writing; on a clean exit it replaces ``path``.

    Args:
      path: the final file; its folder is created.
      mode: ``"wb"`` or ``"w"`` (text; ``kwargs`` such as ``newline=""`` go to the file object).
      fsync: flush the data to the device before the rename (off for the many small files of a
        dataset folder that is itself renamed into place when complete).

    An exception inside the block removes the temporary file and leaves ``path`` as it was.
    """
    path = Path(path)
    with _write_temporary(path, mode, fsync, **kwargs) as (f, tmp):
        yield f
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes, *, fsync: bool = True) -> None:
    """``data`` to ``path`` through :func:`atomic_open`."""
    with atomic_open(path, "wb", fsync=fsync) as f:
        f.write(data)


def write_text_atomic(path: str | os.PathLike, text: str, *, fsync: bool = True) -> None:
    """``text`` (UTF-8) to ``path`` through :func:`atomic_open`."""
    with atomic_open(path, "w", fsync=fsync, encoding="utf-8") as f:
        f.write(text)


class AtomicFileSet:
    """Files that replace their old versions as one set.

    Each file goes to a temporary sibling first (:meth:`open`, :meth:`write_bytes`,
    :meth:`write_text`); :meth:`commit` (a clean exit of the ``with`` block) then renames them all,
    and :meth:`discard` (an exception in the block) removes them. A failure or a kill while the new
    versions are written leaves every old file as it was. The renames are not one atomic step: a
    kill during them (a few metadata operations, no data left to write) is the only moment that
    can leave some new files beside old ones, and a SIGKILL before them leaves the
    ``.<name>.<id>.tmp`` siblings behind, never a final file.

        with AtomicFileSet() as outputs:
            outputs.write_text(results, json_text)
            with outputs.open(table, "w", newline="") as f:
                csv.writer(f).writerows(rows)
    """

    def __init__(self) -> None:
        self._staged: dict[Path, Path] = {}

    @contextlib.contextmanager
    def open(self, path: str | os.PathLike, mode: str = "wb", **kwargs: Any) -> Iterator[IO]:
        """Write the new version of ``path`` (see :func:`atomic_open`); it lands at :meth:`commit`."""
        path = Path(path)
        if path in self._staged:
            raise ValueError(f"{path} is written twice in one file set")
        with _write_temporary(path, mode, True, **kwargs) as (f, tmp):
            yield f
        self._staged[path] = tmp

    def write_bytes(self, path: str | os.PathLike, data: bytes) -> None:
        with self.open(path, "wb") as f:
            f.write(data)

    def write_text(self, path: str | os.PathLike, text: str) -> None:
        with self.open(path, "w", encoding="utf-8") as f:
            f.write(text)

    def commit(self) -> None:
        """Rename every staged file onto its final path."""
        while self._staged:
            path, tmp = next(iter(self._staged.items()))
            os.replace(tmp, path)
            del self._staged[path]

    def discard(self) -> None:
        """Remove every staged file; the final paths keep their old versions."""
        for tmp in self._staged.values():
            tmp.unlink(missing_ok=True)
        self._staged.clear()

    def __enter__(self) -> AtomicFileSet:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            try:
                self.commit()
            finally:
                self.discard()  # what a failed rename left staged
        else:
            self.discard()
