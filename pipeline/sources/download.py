"""Streaming downloads with resume and hash verification.

Pure library code: no DVC, no MLflow. ``pipeline.fetch`` decides *what* to fetch; this module
only knows how to get one URL onto disk safely:

- the body streams into ``<dest>.part`` (hashed on the fly, with a tqdm bar);
- a partial ``.part`` left by a cut connection or an earlier run is resumed with an HTTP
  ``Range`` request, only if it is a piece of the server's current file: the ETag / Last-Modified
  of the response that started it are kept in ``<dest>.part.json`` and sent as ``If-Range``, and
  the file restarts from zero when the server answers with the whole file (200: another version,
  or a server that ignores ranges) or with validators that differ. A part whose version cannot be
  confirmed (no validator) is resumed only when a sha256 will check the result; without one it
  restarts from zero, so a stale part can never become an accepted (and hash-pinned) file;
- the sha256 and size are checked before ``os.replace`` moves the file to its final name, so a
  file at the final path is always complete and verified; a mismatch removes the ``.part`` and
  raises :class:`ChecksumError` naming the file and both hashes. A file downloaded without an
  expected sha256 is logged as trust-on-first-use: its hash is recorded, not verified.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from tqdm.auto import tqdm

from stable_sam.atomic_write import write_text_atomic
from stable_sam.checkpoint import file_sha256

__all__ = ["ChecksumError", "DownloadError", "DownloadResult", "download_file"]


logger = logging.getLogger(__name__)


_CHUNK = 1 << 20


# Network reads are smaller: a cut connection loses at most one read's worth of received bytes.
_NET_CHUNK = 1 << 16


class DownloadError(RuntimeError):
    """A URL that could not be fetched (unreachable, HTTP error, too many cut connections)."""


class ChecksumError(DownloadError):
    """A file whose size or sha256 differs from the expected one."""


@dataclass(frozen=True)
class DownloadResult:
    """What :func:`download_file` put on disk."""

    path: Path
    sha256: str
    bytes: int
    # True when nothing was transferred because a verified file was already in place.
    already_present: bool
    # Number of HTTP requests that resumed a partial file with a Range header.
    resumed_requests: int
    seconds: float


def _check(
    name: str, url: str, size: int, digest: str, expected_size: int | None, expected_sha256: str | None
) -> None:
    if expected_size is not None and size != expected_size:
        raise ChecksumError(f"{name}: size mismatch: expected {expected_size} bytes, got {size} (from {url})")
    if expected_sha256 is not None and digest != expected_sha256.lower():
        raise ChecksumError(
            f"{name}: sha256 mismatch: expected {expected_sha256.lower()}, got {digest} (from {url})"
        )


def download_file(
    url: str,
    dest: str | Path,
    *,
    expected_sha256: str | None = None,
    expected_size: int | None = None,
    timeout: float = 60.0,
    retries: int = 3,
    backoff_s: float = 1.0,
    session: requests.Session | None = None,
    chunk_size: int = _NET_CHUNK,
) -> DownloadResult:
    """Download ``url`` to ``dest``, resuming a partial file and verifying size and sha256.

    Args:
      url: http(s) URL.
      dest: final path. Its folder is created. While downloading, the data lives in
        ``<dest>.part`` in the same folder (so the final rename is atomic).
      expected_sha256: hex digest the file must have; None accepts any content (the caller
        records the returned hash, see ``fetch.trust_unverified``).
      expected_size: byte size the file must have; None skips the size check.
      timeout: seconds for connecting and for each read.
      retries: how many times a cut or failed transfer is retried (resuming where it stopped).
      backoff_s: sleep before retry k is ``backoff_s * 2**k``.
      session: a ``requests.Session`` to reuse (tests, connection pooling).

    Returns:
      A :class:`DownloadResult`. A ``dest`` that already exists with the expected hash is
      returned without any request; one with a different hash is replaced (it is inside our
      download folder; the caller never points ``dest`` at a user's own file).

    Raises:
      DownloadError: HTTP errors (404, ...), unreachable host, or still cut after ``retries``.
      ChecksumError: the complete file has the wrong size or sha256; nothing is left at
        ``dest`` nor at ``<dest>.part``.
    """
    dest = Path(dest)
    name = dest.name
    dest.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if dest.exists():
        digest = file_sha256(dest)
        size = dest.stat().st_size
        try:
            _check(name, str(dest), size, digest, expected_size, expected_sha256)
            logger.info("%s: already present and verified", dest)
            return DownloadResult(dest, digest, size, True, 0, time.perf_counter() - start)
        except ChecksumError as err:
            logger.warning("%s; removing it and downloading again", err)
            dest.unlink()

    part = dest.with_name(dest.name + ".part")
    own_session = session is None
    session = session or requests.Session()
    resumed = 0
    try:
        for attempt in range(retries + 1):
            try:
                resumed += _transfer(
                    url,
                    part,
                    session,
                    timeout=timeout,
                    chunk_size=chunk_size,
                    size=expected_size,
                    verified=expected_sha256 is not None,
                )
                break
            except (
                requests.ConnectionError,
                requests.Timeout,
                requests.exceptions.ChunkedEncodingError,
            ) as err:
                if attempt == retries:
                    have = part.stat().st_size if part.exists() else 0
                    kept = f" ({have} bytes kept in {part} for a later resume)" if have else ""
                    raise DownloadError(
                        f"{name}: could not download {url} after {retries + 1} attempt(s){kept}: {err}"
                    ) from err
                wait = backoff_s * 2**attempt
                logger.warning("%s: transfer interrupted (%s); retrying in %.1f s", name, err, wait)
                time.sleep(wait)
    finally:
        if own_session:
            session.close()

    digest, size = file_sha256(part), part.stat().st_size
    try:
        _check(name, url, size, digest, expected_size, expected_sha256)
    except ChecksumError:
        part.unlink(missing_ok=True)
        _validators_file(part).unlink(missing_ok=True)
        raise
    with open(part, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(part, dest)
    _validators_file(part).unlink(missing_ok=True)
    seconds = time.perf_counter() - start
    logger.info("%s: %d bytes, sha256 %s, %.1f s", dest, size, digest, seconds)
    if expected_sha256 is None:
        logger.warning(
            "%s: no published sha256 to verify it against; its sha256 %s is recorded as "
            "trust-on-first-use, not verified",
            dest,
            digest,
        )
    return DownloadResult(dest, digest, size, False, resumed, seconds)


def _validators_file(part: Path) -> Path:
    return part.with_name(part.name + ".json")


def _validators(headers: Any) -> dict[str, str]:
    """The version identifiers of a response: a strong ETag and/or Last-Modified."""
    found = {}
    etag = headers.get("ETag")
    if etag and not etag.startswith("W/"):  # If-Range needs a strong validator
        found["etag"] = etag
    if headers.get("Last-Modified"):
        found["last_modified"] = headers["Last-Modified"]
    return found


def _stored_validators(part: Path, url: str) -> dict[str, str]:
    """The validators of the response that started ``part``; empty when unknown or for another URL."""
    try:
        stored = json.loads(_validators_file(part).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        logger.warning(
            "%s: unreadable (%s); the partial file's version is unknown", _validators_file(part), err
        )
        return {}
    if not isinstance(stored, dict) or stored.get("url") != url:
        return {}
    return {k: stored[k] for k in ("etag", "last_modified") if isinstance(stored.get(k), str)}


def _same_version(stored: dict[str, str], headers: Any) -> bool | None:
    """True/False when a validator of the response matches/differs from the stored one, else None."""
    current = _validators(headers)
    shared = [k for k in ("etag", "last_modified") if k in stored and k in current]
    if not shared:
        return None
    return all(stored[k] == current[k] for k in shared)


def _restart(part: Path) -> None:
    part.unlink(missing_ok=True)
    _validators_file(part).unlink(missing_ok=True)


def _transfer(
    url: str,
    part: Path,
    session: requests.Session,
    *,
    timeout: float,
    chunk_size: int,
    size: int | None,
    verified: bool,
) -> int:
    """Append the rest of ``url`` to ``part``; returns 1 if the request resumed with a Range.

    ``verified``: a sha256 will check the complete file, so a part whose version cannot be
    confirmed may still be resumed (a stale one fails that check instead of being accepted).
    """
    name = part.name[: -len(".part")]
    offset = part.stat().st_size if part.exists() else 0
    if size is not None and offset > size:  # a stale part of some other file
        _restart(part)
        offset = 0
    stored = _stored_validators(part, url) if offset else {}
    headers = {}
    if offset:
        if_range = stored.get("etag") or stored.get("last_modified")
        if if_range is None and not verified:
            logger.info(
                "%s: the version of the partial file %s is unknown (no ETag/Last-Modified stored) and "
                "there is no sha256 to check a resumed file: restarting from byte 0",
                name,
                part,
            )
            _restart(part)
            offset = 0
        else:
            headers["Range"] = f"bytes={offset}-"
            if if_range is not None:
                headers["If-Range"] = if_range
    try:
        response = session.get(url, headers=headers, stream=True, timeout=timeout)
    except requests.exceptions.InvalidURL as err:
        raise DownloadError(f"{name}: invalid URL {url!r}: {err}") from err
    with response:
        if response.status_code >= 400 and not (response.status_code == 416 and offset):
            raise DownloadError(f"{name}: HTTP {response.status_code} {response.reason} for {url}")
        same = _same_version(stored, response.headers) if offset else None
        if (
            offset
            and response.status_code in (206, 416)
            and (same is False or (same is None and not verified))
        ):
            # A server that ignored If-Range answered for another version, or for a version we
            # cannot confirm: the part may be a piece of another file.
            if same is False:
                logger.warning(
                    "%s: the server's file changed since %s was started (stored %s, server %s): "
                    "restarting from byte 0",
                    name, part, stored, _validators(response.headers),
                )  # fmt: skip
            else:
                logger.warning(
                    "%s: the server does not confirm that %s is a piece of its current file (no "
                    "ETag/Last-Modified in its answer) and there is no sha256 to check a resumed "
                    "file: restarting from byte 0",
                    name, part,
                )  # fmt: skip
            response.close()
            _restart(part)
            return _transfer(
                url, part, session, timeout=timeout, chunk_size=chunk_size, size=size, verified=verified
            )
        if response.status_code == 416:
            # The part already holds every byte of this version: verify it as it is.
            return 0
        resumed = response.status_code == 206 and offset > 0
        if offset and not resumed:
            logger.info(
                "%s: the server sent the whole file (another version, or it ignores Range): "
                "restarting from byte 0",
                url,
            )
            offset = 0
        if resumed:
            content_range = response.headers.get("Content-Range", "")
            if not content_range.startswith(f"bytes {offset}-"):
                raise DownloadError(
                    f"{url}: unexpected Content-Range {content_range!r} for a resume at {offset}"
                )
        else:
            # Recorded before the first byte, so a cut transfer resumes against this very version.
            write_text_atomic(
                _validators_file(part), json.dumps({"url": url, **_validators(response.headers)})
            )
        length = response.headers.get("Content-Length")
        total = size if size is not None else (offset + int(length) if length is not None else None)
        with (
            open(part, "ab" if resumed else "wb") as f,
            tqdm(
                total=total,
                initial=offset,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=name,
                leave=False,
            ) as bar,
        ):
            for block in response.iter_content(chunk_size=chunk_size):
                f.write(block)
                bar.update(len(block))
        return int(resumed)
