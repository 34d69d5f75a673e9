"""Safe archive extraction: zip and tar members stay inside the target folder.

:func:`safe_extract` refuses, before writing anything, every zip/tar member that is absolute,
climbs out with ``..``, is a link (symbolic or hard) or a device, and extracts into a temporary
sibling folder that is renamed into place only when complete.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

__all__ = ["UnsafeArchiveError", "safe_extract"]


_CHUNK = 1 << 20


# Members that archivers add on their own and that no dataset needs.
_JUNK_PREFIXES = ("__MACOSX/",)


_JUNK_NAMES = (".DS_Store",)


class UnsafeArchiveError(ValueError):
    """An archive with members that would land outside the target folder, or links."""


def _member_path(name: str, archive: Path) -> PurePosixPath | None:
    """The member's relative path, None for junk, or an error for anything escaping the target."""
    clean = name.replace("\\", "/")
    if clean.startswith(_JUNK_PREFIXES) or PurePosixPath(clean).name in _JUNK_NAMES:
        return None
    path = PurePosixPath(clean)
    if path.is_absolute() or clean.startswith("/") or (len(clean) > 1 and clean[1] == ":"):
        raise UnsafeArchiveError(f"{archive}: member {name!r} has an absolute path")
    if ".." in path.parts:
        raise UnsafeArchiveError(f"{archive}: member {name!r} would be extracted outside the target folder")
    parts = [p for p in path.parts if p not in ("", ".")]
    return PurePosixPath(*parts) if parts else None


def _zip_members(archive: Path, zf: zipfile.ZipFile) -> list[tuple[zipfile.ZipInfo, PurePosixPath]]:
    members = []
    for info in zf.infolist():
        rel = _member_path(info.filename, archive)
        if rel is None:
            continue
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise UnsafeArchiveError(f"{archive}: member {info.filename!r} is a symbolic link; refused")
        # Archivers that record no file type leave S_IFMT at 0: a plain file.
        if stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise UnsafeArchiveError(f"{archive}: member {info.filename!r} is not a regular file; refused")
        members.append((info, rel))
    return members


def _tar_members(archive: Path, tf: tarfile.TarFile) -> list[tuple[tarfile.TarInfo, PurePosixPath]]:
    members = []
    for info in tf.getmembers():
        rel = _member_path(info.name, archive)
        if rel is None:
            continue
        if info.issym() or info.islnk():
            raise UnsafeArchiveError(
                f"{archive}: member {info.name!r} is a link ({info.linkname!r}); refused"
            )
        if not (info.isfile() or info.isdir()):
            raise UnsafeArchiveError(f"{archive}: member {info.name!r} is not a regular file; refused")
        members.append((info, rel))
    return members


def _strip_top(rels: list[PurePosixPath], top: str | None) -> bool:
    """True when every member lies under one folder named ``top`` (the archive repeats the target)."""
    if top is None or not rels:
        return False
    return all(len(r.parts) >= 1 and r.parts[0] == top for r in rels) and any(len(r.parts) > 1 for r in rels)


def _copy_stream(src: BinaryIO, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "wb") as out:
        shutil.copyfileobj(src, out, _CHUNK)


def _extract_members(
    archive: Path,
    members: list[tuple[Any, PurePosixPath]],
    tmp: Path,
    dest: Path,
    *,
    is_dir: Callable[[Any], bool],
    open_member: Callable[[Any], Any],
    strip_matching_top: bool,
) -> list[Path]:
    """Write already-vetted (member, relative path) pairs of a zip or tar into ``tmp``.

    Returns the paths the files will have under ``dest`` once ``tmp`` is renamed into place.
    """
    strip = strip_matching_top and _strip_top([r for _, r in members], dest.name)
    written: list[Path] = []
    for info, rel in tqdm(members, desc=f"extract {archive.name}", unit="file", leave=False):
        rel = PurePosixPath(*rel.parts[1:]) if strip else rel
        if not rel.parts:
            continue
        target = tmp.joinpath(*rel.parts)
        if is_dir(info):
            target.mkdir(parents=True, exist_ok=True)
            continue
        src = open_member(info)
        if src is None:  # tarfile: cannot happen for regular files; guard anyway
            raise UnsafeArchiveError(f"{archive}: member {getattr(info, 'name', info)!r} has no data")
        with src:
            _copy_stream(src, target)
        written.append(dest.joinpath(*rel.parts))
    return written


def safe_extract(archive: str | Path, dest: str | Path, *, strip_matching_top: bool = True) -> list[Path]:
    """Extract a zip or tar archive into ``dest``, refusing anything that could escape it.

    All members are checked before anything is written: absolute paths, ``..`` components,
    symbolic and hard links, devices and FIFOs make the whole archive fail with
    :class:`UnsafeArchiveError` naming the member. ``__MACOSX/`` and ``.DS_Store`` entries are
    skipped. Extraction goes to a temporary sibling of ``dest`` that replaces ``dest`` only when
    complete, so an interrupted run never leaves a half-extracted ``dest``.

    Args:
      archive: a ``.zip`` or anything ``tarfile`` opens (``.tar``, ``.tar.gz``, ...).
      dest: the target folder; an existing one is replaced.
      strip_matching_top: when every member lies under one folder whose name equals
        ``dest.name`` (``DIS5K.zip`` holds ``DIS5K/...``), extract its contents directly into
        ``dest`` instead of ``dest/DIS5K``. Archives with or without that top folder then give
        the same layout.

    Returns:
      The extracted file paths (under ``dest``), sorted.
    """
    archive, dest = Path(archive), Path(dest)
    if not archive.is_file():
        raise FileNotFoundError(f"archive not found: {archive}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.extract-{os.getpid()}"
    if tmp.exists():  # left by a killed run
        shutil.rmtree(tmp)
    tmp.mkdir()  # (not mkdtemp: its 0700 mode would end up on the extracted folder)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                written = _extract_members(
                    archive, _zip_members(archive, zf), tmp, dest,
                    is_dir=lambda info: info.is_dir(), open_member=zf.open, strip_matching_top=strip_matching_top,
                )  # fmt: skip
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tf:
                written = _extract_members(
                    archive, _tar_members(archive, tf), tmp, dest,
                    is_dir=lambda info: info.isdir(), open_member=tf.extractfile, strip_matching_top=strip_matching_top,
                )  # fmt: skip
        else:
            raise UnsafeArchiveError(f"{archive}: not a zip or tar archive")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("extracted %d files from %s into %s", len(written), archive, dest)
    return sorted(written)
