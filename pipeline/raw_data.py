"""The two manifests of the raw data, shared by the fetch stage and every stage that reads data.

- ``pipeline/manifest.json`` (in git), the **file manifest**: every downloadable file with its
  URL, size, sha256, kind (checkpoint / archive), where an archive is extracted and what must
  exist afterwards. :func:`load_file_manifest` reads it.
- ``<raw>/manifest.json`` (a DVC output of the fetch stage), the **raw-data manifest**: what
  the fetch stage actually put in place. :func:`read_raw_manifest` reads it::

      {
        "format": 1,
        "source": "embedded" | "remote" | "local",
        "downloads": PATH (where downloads, .part files and hand-placed files go),
        "datasets": {NAME: {"root": PATH, "items": [...], "splits"/"sets": {...counts...}}},
                    (a set's counts: valid_pairs, skipped = every file left out, unmatched =
                     the stray files among them: an image without a mask or the reverse)
        "checkpoints": {SAM_TYPE: {"path": PATH, "sha256": HEX, "bytes": N, "item": NAME,
                                   "verified": "manifest" | "trusted_first_download"}},
        "items": {ITEM: {"sha256", "bytes", "verified", "url" | "path"}},
        "skipped": {DATASET: [{"path": P, "reason": R}, ...]}, (bad and stray files)
        "counts": {...}, "seeds": {"embedded": S},
        "params": {"fetch": {...}, "embedded": {...}}
      }

  PATHs inside the raw folder are stored relative to it (the folder can move with DVC);
  a user's own files (``fetch.source: local``) are stored as absolute paths. The manifest holds
  no wall-clock values (timings are stage metrics, logged to MLflow), so a rerun that changes
  nothing writes the same bytes and DVC skips every stage downstream.

Dataset *names* (``data.train`` / ``data.val``) map to a family root through
:func:`stable_sam.data.dataset_family`: "hqseg44k" and its components and the four HQ eval sets
live under the "hqseg44k" root, "embedded" under "embedded", COCO under "coco_val2017".
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stable_sam import data as data_lib

__all__ = [
    "FILE_MANIFEST",
    "RAW_MANIFEST_NAME",
    "FileItem",
    "FileManifest",
    "RawDataError",
    "RawManifest",
    "how_to_get_checkpoint",
    "how_to_get_dataset",
    "load_file_manifest",
    "placement_hint",
    "portable_path",
    "read_raw_manifest",
    "write_raw_manifest",
]

FILE_MANIFEST = Path(__file__).with_name("manifest.json")
RAW_MANIFEST_NAME = "manifest.json"
RAW_FORMAT = 1
_KINDS = ("checkpoint", "archive")


class RawDataError(RuntimeError):
    """Raw data that is missing or inconsistent; the message says how to get it."""


# ------------------------------------------------------------------------------------------------
# File manifest (pipeline/manifest.json)


@dataclass(frozen=True)
class FileItem:
    """One downloadable file of the file manifest."""

    name: str
    kind: str  # "checkpoint" or "archive"
    filename: str
    url: str
    bytes: int | None
    sha256: str | None  # None: not published (see fetch.trust_unverified)
    sam_type: str | None = None  # checkpoints
    dataset: str | None = None  # archives: the dataset family they belong to
    extract_to: str | None = None  # archives: folder relative to the raw folder
    expect: tuple[str, ...] = ()  # archives: paths that must exist under extract_to


@dataclass(frozen=True)
class FileManifest:
    """The parsed file manifest."""

    items: dict[str, FileItem]
    groups: dict[str, tuple[str, ...]]
    dataset_roots: dict[str, str]  # family -> folder relative to the raw folder
    path: Path

    def expand(self, names: Sequence[str]) -> list[FileItem]:
        """Items named directly or through a group, in order, without duplicates."""
        out: list[FileItem] = []
        for name in names:
            if name in self.groups:
                members = list(self.groups[name])
            elif name in self.items:
                members = [name]
            else:
                raise RawDataError(
                    f"fetch.items: unknown item {name!r}; known items: {sorted(self.items)}, "
                    f"groups: {sorted(self.groups)} (and 'embedded'); see {self.path}"
                )
            out.extend(self.items[m] for m in members if self.items[m] not in out)
        return out

    def checkpoint_item(self, sam_type: str) -> FileItem | None:
        return next(
            (i for i in self.items.values() if i.kind == "checkpoint" and i.sam_type == sam_type), None
        )

    def dataset_items(self, family: str) -> list[FileItem]:
        return [i for i in self.items.values() if i.kind == "archive" and i.dataset == family]

    def group_of(self, family: str) -> str | None:
        members = {i.name for i in self.dataset_items(family)}
        return next((g for g, m in self.groups.items() if set(m) == members), None)


def load_file_manifest(path: str | Path = FILE_MANIFEST) -> FileManifest:
    """Parse and check ``pipeline/manifest.json`` (or a test's own manifest)."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise RawDataError(f"cannot read the file manifest {path}: {err}") from err
    items = {}
    for name, entry in raw.get("items", {}).items():
        where = f"{path}: item {name!r}"
        missing = [k for k in ("kind", "filename", "url", "bytes", "sha256") if k not in entry]
        if missing:
            raise RawDataError(f"{where}: missing key(s) {missing}")
        if entry["kind"] not in _KINDS:
            raise RawDataError(f"{where}: kind must be one of {_KINDS}, got {entry['kind']!r}")
        if entry["kind"] == "checkpoint" and not entry.get("sam_type"):
            raise RawDataError(f"{where}: a checkpoint needs 'sam_type'")
        if entry["kind"] == "archive" and not (entry.get("extract_to") and entry.get("dataset")):
            raise RawDataError(f"{where}: an archive needs 'extract_to' and 'dataset'")
        sha = entry["sha256"]
        if sha is not None and (len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha.lower())):
            raise RawDataError(f"{where}: sha256 must be 64 hex digits or null, got {sha!r}")
        items[name] = FileItem(
            name=name,
            kind=entry["kind"],
            filename=entry["filename"],
            url=entry["url"],
            bytes=entry["bytes"],
            sha256=sha.lower() if sha else None,
            sam_type=entry.get("sam_type"),
            dataset=entry.get("dataset"),
            extract_to=entry.get("extract_to"),
            expect=tuple(entry.get("expect", ())),
        )
    groups = {g: tuple(m) for g, m in raw.get("groups", {}).items()}
    for group, members in groups.items():
        unknown = [m for m in members if m not in items]
        if unknown:
            raise RawDataError(f"{path}: group {group!r} names unknown item(s) {unknown}")
    return FileManifest(items, groups, dict(raw.get("dataset_roots", {})), path)


def placement_hint(item: FileItem, *, download_dir: Path, raw_dir: Path, local_root: str = "DIR") -> str:
    """How to put one item in place by hand: exact paths for each source."""
    size = f"{item.bytes} bytes, " if item.bytes is not None else ""
    sha = f"sha256 {item.sha256}" if item.sha256 else "no published sha256"
    lines = [
        f"  - {item.name}: {item.url} ({size}{sha})",
        f"      by hand: put the file at {download_dir / item.filename} and rerun the fetch stage "
        "(fetch.source=remote verifies a file already there instead of downloading it)",
    ]
    if item.kind == "checkpoint":
        lines.append(f"      or fetch.source=local: {Path(local_root) / item.filename}")
    else:
        expect = ", ".join(item.expect) or "(contents of the archive)"
        lines.append(
            f"      or fetch.source=local: the extracted folder at {Path(local_root) / item.extract_to} "
            f"containing {expect}"
        )
        lines.append(f"      (a remote fetch extracts it to {raw_dir / item.extract_to})")
    return "\n".join(lines)


def how_to_get_dataset(
    name: str, raw_dir: Path, manifest: FileManifest | None = None, downloads: Path | None = None
) -> str:
    """A multi-line explanation of how to fetch a dataset that is not in the raw folder."""
    family = data_lib.dataset_family(name)
    if family == "embedded":
        return "set fetch.source=embedded (or add 'embedded' to fetch.items) and rerun `dvc repro fetch`"
    manifest = manifest or load_file_manifest()
    items = manifest.dataset_items(family) if family else []
    downloads = downloads or raw_dir / "downloads"
    if not items:
        return f"{name!r} is not a registered dataset; give a folder path in the HQSeg layout instead"
    group = manifest.group_of(family) or ", ".join(i.name for i in items)
    hints = "\n".join(placement_hint(i, download_dir=downloads, raw_dir=raw_dir) for i in items)
    return (
        f"set fetch.source=remote and fetch.items=[{group}] and rerun `dvc repro fetch`; without network, "
        f"place the files by hand:\n{hints}\n"
        f"  or, with the data already on disk: fetch.source=local, fetch.local_root=DIR, fetch.items=[{group}]"
    )


def how_to_get_checkpoint(
    sam_type: str, raw_dir: Path, manifest: FileManifest | None = None, downloads: Path | None = None
) -> str:
    """A multi-line explanation of how to fetch the official SAM checkpoint of ``sam_type``."""
    manifest = manifest or load_file_manifest()
    item = manifest.checkpoint_item(sam_type)
    if item is None:
        known = sorted(i.sam_type for i in manifest.items.values() if i.kind == "checkpoint")
        return f"there is no official checkpoint for SAM type {sam_type!r} (official: {known})"
    return (
        f"add {item.name!r} to fetch.items with fetch.source=remote and rerun `dvc repro fetch`, or place it "
        f"by hand:\n{placement_hint(item, download_dir=downloads or raw_dir / 'downloads', raw_dir=raw_dir)}\n"
        f"  or point sam.checkpoint at a file you already have"
    )


# ------------------------------------------------------------------------------------------------
# Raw-data manifest (<raw>/manifest.json)


def portable_path(path: Path, raw_dir: Path) -> str:
    """How a path is stored in the raw-data manifest.

    Relative to the raw folder when inside it or next to it (``../downloads/x.pth`` for a
    downloads folder beside ``data/raw``), so the project can move; absolute otherwise (a
    user's own files).
    """
    path, raw_dir = Path(os.path.abspath(path)), Path(os.path.abspath(raw_dir))
    for base, prefix in ((raw_dir, ""), (raw_dir.parent, "../")):
        try:
            return prefix + path.relative_to(base).as_posix()
        except ValueError:
            continue
    return str(path)


def write_raw_manifest(raw_dir: str | Path, content: dict[str, Any]) -> Path:
    """Write ``<raw>/manifest.json`` atomically (sorted keys: stable bytes for DVC)."""
    raw_dir = Path(raw_dir)
    raw_dir.mkdir(parents=True, exist_ok=True)
    target = raw_dir / RAW_MANIFEST_NAME
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"format": RAW_FORMAT, **content}, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, target)
    return target


@dataclass
class RawManifest:
    """The parsed raw-data manifest of one raw folder."""

    raw_dir: Path
    content: dict[str, Any]

    @property
    def source(self) -> str:
        return self.content.get("source", "?")

    @property
    def downloads(self) -> Path:
        """The downloads folder the fetch stage used (hand-placed files go there)."""
        return self._resolve(self.content.get("downloads", "downloads"))

    def _resolve(self, stored: str) -> Path:
        path = Path(stored)
        return path if path.is_absolute() else Path(os.path.normpath(self.raw_dir / path))

    @property
    def datasets(self) -> list[str]:
        return sorted(self.content.get("datasets", {}))

    def dataset_root(self, name: str) -> Path:
        """The family root of a registered dataset name, or the path itself for a folder.

        Raises:
          RawDataError: a registered dataset that the fetch stage did not put in place; the
            message says how to fetch it or place it by hand.
        """
        family = data_lib.dataset_family(name)
        if family is None:
            path = Path(name)
            if not path.exists():
                raise RawDataError(
                    f"dataset {name!r} is neither a registered name ({sorted(data_lib.DATASETS)}) nor an "
                    "existing folder"
                )
            return path
        entry = self.content.get("datasets", {}).get(family)
        if entry is None:
            raise RawDataError(
                f"dataset {name!r} (family {family!r}) is not in {self.raw_dir / RAW_MANIFEST_NAME} "
                f"(fetched: {self.datasets or 'nothing'}). To get it: "
                f"{how_to_get_dataset(name, self.raw_dir, downloads=self.downloads)}"
            )
        return self._resolve(entry["root"])

    def skipped(self, name: str) -> dict[str, str]:
        """Files of a dataset the fetch stage found bad: absolute path -> reason."""
        family = data_lib.dataset_family(name)
        records = self.content.get("skipped", {}).get(family or name, [])
        return {str(self._resolve(r["path"])): r["reason"] for r in records}

    def validated_fully(self, name: str) -> bool:
        """Whether the fetch stage decoded every pair of this registered dataset's family
        (``fetch.validate: full``), so that its skip list already holds every undecodable file."""
        family = data_lib.dataset_family(name)
        validated = self.content.get("params", {}).get("fetch", {}).get("validate")
        return family is not None and family in self.content.get("datasets", {}) and validated == "full"

    def open_dataset(
        self, name: str, *, split: str, validate: str | None = None
    ) -> data_lib.SegmentationFolder:
        """:func:`stable_sam.data.open_dataset` with the root and known-bad files from the manifest.

        ``validate`` None: "header" for a registered dataset the fetch stage validated fully (its
        bad files come from the manifest's skip list), "full" for everything else (a folder path,
        or data fetched with ``fetch.validate: header``), so that every index decodes and the
        length is the number of distinct usable images. Stray and bad files are in the
        dataset's ``skipped``.
        """
        root = self.dataset_root(name)
        if validate is None:
            validate = "header" if self.validated_fully(name) else "full"
        if data_lib.dataset_family(name) is None:
            return data_lib.open_dataset(str(root), split=split, validate=validate)
        return data_lib.open_dataset(
            name, split=split, root=root, validate=validate, exclude=self.skipped(name)
        )

    def checkpoint(self, sam_type: str) -> tuple[Path, str] | None:
        """(path, verified sha256) of the official SAM checkpoint of ``sam_type``, or None."""
        entry = self.content.get("checkpoints", {}).get(sam_type)
        if entry is None:
            return None
        return self._resolve(entry["path"]), entry["sha256"]

    def require_checkpoint(self, sam_type: str) -> tuple[Path, str]:
        """Like :meth:`checkpoint`, but a missing one is an error that says how to fetch it."""
        found = self.checkpoint(sam_type)
        if found is None:
            raise RawDataError(
                f"no SAM checkpoint for {sam_type!r} in {self.raw_dir / RAW_MANIFEST_NAME}. To get it: "
                f"{how_to_get_checkpoint(sam_type, self.raw_dir, downloads=self.downloads)}"
            )
        if not found[0].is_file():
            raise RawDataError(
                f"the manifest lists {found[0]} for {sam_type!r} but the file is gone; rerun fetch"
            )
        return found


def read_raw_manifest(raw_dir: str | Path) -> RawManifest:
    """Read ``<raw>/manifest.json`` written by the fetch stage."""
    raw_dir = Path(raw_dir)
    path = raw_dir / RAW_MANIFEST_NAME
    if not path.is_file():
        raise RawDataError(
            f"no raw-data manifest at {path}: run the fetch stage first "
            f"(`dvc repro fetch`, or `python -m pipeline.fetch --out {raw_dir}`)"
        )
    try:
        content = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise RawDataError(f"{path}: not valid JSON ({err}); rerun the fetch stage") from err
    if content.get("format") != RAW_FORMAT:
        raise RawDataError(
            f"{path}: format {content.get('format')!r}, expected {RAW_FORMAT}; rerun the fetch stage"
        )
    return RawManifest(raw_dir, content)
