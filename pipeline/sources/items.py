"""The files of ``pipeline/manifest.json`` put in place: downloaded and verified (``remote``) or
found and verified where the user keeps them (``local``); every failure says where to put the file.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import requests

from pipeline.params import Params
from pipeline.raw_data import (
    FileItem,
    placement_hint,
    portable_path,
)
from pipeline.sources import DownloadError, download_file, safe_extract
from stable_sam.checkpoint import file_sha256

__all__ = ["FetchError", "fetch_local", "fetch_remote"]


logger = logging.getLogger(__name__)

_MARKER = ".fetch-complete.json"  # in an extracted folder: what was extracted, from which file
EXTRACTED = "extracted"  # archives are extracted into <downloads>/extracted/<extract_to>


def extract_root(download_dir: Path) -> Path:
    """Where remote archives are extracted: inside the downloads folder, outside the DVC output.

    ``dvc repro`` deletes ``data/raw`` before rerunning fetch (any change to its code or params)
    and caches what it holds: extracted data there would be re-downloaded (``keep_archives:
    false``) or re-extracted, and cached a second time (8.4 GB of HQSeg-44K). Beside the
    downloads it survives reruns; ``data/raw/manifest.json`` points at it (relative path).
    """
    return download_dir / EXTRACTED


class FetchError(RuntimeError):
    """Files that could not be fetched or verified; the message says how to place them by hand."""


def _check_trust(item: FileItem, params: Params) -> None:
    if item.sha256 is None and item.name not in params.fetch.trust_unverified:
        raise FetchError(
            f"{item.name}: pipeline/manifest.json has no published sha256 for {item.filename}, so its "
            f"content cannot be verified. To accept the first download's hash (it is then recorded in "
            f"the raw-data manifest), add it explicitly: --set 'fetch.trust_unverified=[{item.name}]'"
        )


def _missing_expected(folder: Path, item: FileItem) -> list[str]:
    return [str(folder / e) for e in item.expect if not (folder / e).exists()]


def _fetch_remote_item(
    item: FileItem,
    params: Params,
    out: Path,
    download_dir: Path,
    session: requests.Session,
    record: dict[str, Any],
) -> None:
    cfg = params.fetch
    _check_trust(item, params)
    if item.kind == "archive":
        target = extract_root(download_dir) / item.extract_to
        marker = target / _MARKER
        if marker.is_file() and not _missing_expected(target, item):
            done = json.loads(marker.read_text())
            if item.sha256 is None or done.get("sha256") == item.sha256:
                logger.info("%s: already extracted in %s", item.name, target)
                record["items"][item.name] = done
                return
    # Trust on first download: the first hash of an unpublished file is pinned next to it, and
    # every later run verifies against the pin.
    pin = download_dir / f"{item.filename}.sha256"
    expected = item.sha256 or (pin.read_text().strip() if pin.is_file() else None)
    result = download_file(
        item.url,
        download_dir / item.filename,
        expected_sha256=expected,
        expected_size=item.bytes,
        timeout=cfg.timeout_s,
        retries=cfg.retries,
        session=session,
    )
    if item.sha256 is None and not pin.is_file():
        pin.write_text(result.sha256 + "\n")
        logger.warning(
            "%s: no published sha256; pinned the first download's %s in %s", item.name, result.sha256, pin
        )
    if not result.already_present:
        record["downloaded_bytes"] += result.bytes
    entry = {
        "sha256": result.sha256,
        "bytes": result.bytes,
        "verified": "manifest" if item.sha256 else "trusted_first_download",
        "url": item.url,
    }
    if item.kind == "checkpoint":
        record["checkpoints"][item.sam_type] = {
            "path": portable_path(result.path, out),
            "sha256": result.sha256,
            "bytes": result.bytes,
            "item": item.name,
            "verified": entry["verified"],
        }
    else:
        target = extract_root(download_dir) / item.extract_to
        safe_extract(result.path, target)
        missing = _missing_expected(target, item)
        if missing:
            raise FetchError(
                f"{item.name}: {item.filename} was extracted to {target} but the expected layout is "
                f"missing: {missing}. The archive's layout differs from pipeline/manifest.json; fix "
                "'extract_to'/'expect' there or place the folders by hand with fetch.source=local."
            )
        (target / _MARKER).write_text(json.dumps(entry, sort_keys=True))
        if not cfg.keep_archives:  # the marker makes a rerun skip it; the zip is dead weight
            result.path.unlink()
    record["items"][item.name] = entry


def _fetch_local_item(item: FileItem, params: Params, local_root: Path, record: dict[str, Any]) -> None:
    if item.kind == "checkpoint":
        path = local_root / item.filename
        if not path.is_file():
            raise FetchError(f"{item.name}: expected the checkpoint at {path}")
        _check_trust(item, params)
        digest, size = file_sha256(path), path.stat().st_size
        if item.sha256 is not None and digest != item.sha256:
            raise FetchError(f"{item.name}: {path} has sha256 {digest}, expected {item.sha256}")
        if item.bytes is not None and size != item.bytes:
            raise FetchError(f"{item.name}: {path} has {size} bytes, expected {item.bytes}")
        verified = "manifest" if item.sha256 else "trusted_first_download"
        record["checkpoints"][item.sam_type] = {
            "path": str(path.resolve()),
            "sha256": digest,
            "bytes": size,
            "item": item.name,
            "verified": verified,
        }
        record["items"][item.name] = {
            "path": str(path.resolve()),
            "sha256": digest,
            "bytes": size,
            "verified": verified,
        }
    else:
        folder = local_root / item.extract_to
        if not folder.is_dir():
            raise FetchError(f"{item.name}: expected the extracted folder at {folder}")
        missing = _missing_expected(folder, item)
        if missing:
            raise FetchError(f"{item.name}: {folder} lacks the expected paths {missing}")
        record["items"][item.name] = {"path": str(folder.resolve())}


def fetch_remote(
    items: list[FileItem],
    params: Params,
    out: Path,
    download_dir: Path,
    session: requests.Session | None,
    record: dict[str, Any],
) -> None:
    """Download (resuming) and verify every item; all failures are reported together."""
    failures: list[tuple[FileItem, str]] = []
    own = session is None
    session = session or requests.Session()
    try:
        for item in items:
            try:
                _fetch_remote_item(item, params, out, download_dir, session, record)
            except (DownloadError, FetchError, OSError, ValueError) as err:
                logger.error("%s: %s", item.name, err)
                failures.append((item, str(err)))
    finally:
        if own:
            session.close()
    if failures:
        raise FetchError(_remote_failure_message(failures, download_dir, out))


def fetch_local(
    items: list[FileItem], params: Params, out: Path, download_dir: Path, record: dict[str, Any]
) -> Path:
    """Verify every item where ``fetch.local_root`` holds it; returns that root."""
    if not params.fetch.local_root:
        raise FetchError("fetch.source=local needs fetch.local_root (the folder that holds your files)")
    local_root = Path(params.fetch.local_root).expanduser()
    if not local_root.is_dir():
        raise FetchError(f"fetch.local_root {local_root} is not a folder")
    failures: list[tuple[FileItem, str]] = []
    for item in items:
        try:
            _fetch_local_item(item, params, local_root, record)
        except (FetchError, OSError) as err:
            failures.append((item, str(err)))
    if failures:
        lines = [f"  - {msg}" for _, msg in failures]
        hints = [
            placement_hint(i, download_dir=download_dir, raw_dir=out, local_root=str(local_root))
            for i, _ in failures
        ]
        raise FetchError(
            "fetch.source=local: some files are missing or do not verify:\n"
            + "\n".join(lines)
            + "\nExpected places:\n"
            + "\n".join(hints)
        )
    return local_root


def _remote_failure_message(failures: list[tuple[FileItem, str]], download_dir: Path, out: Path) -> str:
    lines = ["could not fetch every requested file:"]
    for item, message in failures:
        lines.append(f"  - {item.name}: {message}")
    lines.append("To continue without network, place the files by hand:")
    lines.extend(placement_hint(item, download_dir=download_dir, raw_dir=out) for item, _ in failures)
    lines.append(
        "or use data you already have with fetch.source=local and fetch.local_root=DIR, "
        "or the offline dataset with fetch.source=embedded."
    )
    return "\n".join(lines)
