"""Streaming download (resume, verify, atomic rename) against a local HTTP server, and safe extraction."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import stat
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from pipeline.sources import ChecksumError, DownloadError, UnsafeArchiveError, download_file, safe_extract
from stable_sam.checkpoint import file_sha256


class FileServer:
    """A threaded HTTP server on 127.0.0.1 serving in-memory files, with Range support.

    ``cut_first``: paths whose first GET sends the full Content-Length but only half of the body
    and then closes the connection. ``ignore_range``: answer every request with 200 + the full body.
    Every answer carries an ``ETag`` (from the content) and a ``Last-Modified``, unless
    ``validators`` is False; ``If-Range`` is honoured (a differing validator gets 200 + the whole
    file) unless ``ignore_if_range``. ``if_ranges`` records each request's ``If-Range``.
    """

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = dict(files)
        self.cut_first: set[str] = set()
        self.ignore_range = False
        self.ignore_if_range = False
        self.validators = True
        self.requests: list[tuple[str, str | None]] = []
        self.if_ranges: list[str | None] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def do_GET(self) -> None:
                range_header = self.headers.get("Range")
                if_range = self.headers.get("If-Range")
                server.requests.append((self.path, range_header))
                server.if_ranges.append(if_range)
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404, "Not Found")
                    return
                validators = server.file_validators(body) if server.validators else {}
                if if_range and not server.ignore_if_range and if_range not in validators.values():
                    range_header = None  # another version: the whole file
                start = 0
                if range_header and not server.ignore_range:
                    start = int(range_header.removeprefix("bytes=").split("-")[0])
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                payload = body[start:]
                for header, value in validators.items():
                    self.send_header(header, value)
                self.send_header("Content-Length", str(len(payload)))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                if self.path in server.cut_first:
                    server.cut_first.discard(self.path)
                    self.wfile.write(payload[: len(payload) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @staticmethod
    def file_validators(body: bytes) -> dict[str, str]:
        digest = hashlib.sha256(body).hexdigest()
        # A distinct, stable date per content (the test files change within one second).
        return {
            "ETag": f'"{digest[:16]}"',
            "Last-Modified": f"Mon, 01 Jan 2024 00:{int(digest[:8], 16) % 3600 // 60:02d}:"
            f"{int(digest[:8], 16) % 60:02d} GMT",
        }

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> FileServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def payload() -> bytes:
    return np.random.default_rng(0).integers(0, 256, 300_000, dtype=np.uint8).tobytes()


@pytest.fixture
def server(payload):
    with FileServer({"/model.pth": payload}) as srv:
        yield srv


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_download_verifies_and_lands_atomically(tmp_path, server, payload):
    dest = tmp_path / "dl" / "model.pth"
    result = download_file(
        f"{server.url}/model.pth", dest, expected_sha256=sha(payload), expected_size=len(payload)
    )
    assert dest.read_bytes() == payload
    assert result.sha256 == sha(payload) and result.bytes == len(payload)
    assert not result.already_present and result.resumed_requests == 0
    assert not dest.with_name("model.pth.part").exists()


def test_resume_after_cut_connection(tmp_path, server, payload):
    server.cut_first.add("/model.pth")
    dest = tmp_path / "model.pth"
    result = download_file(
        f"{server.url}/model.pth",
        dest,
        expected_sha256=sha(payload),
        retries=2,
        backoff_s=0.0,
        chunk_size=4096,
    )
    assert dest.read_bytes() == payload
    assert len(server.requests) == 2
    assert server.requests[0][1] is None
    # The second request asks only for what is missing.
    assert server.requests[1][1] is not None and server.requests[1][1].startswith("bytes=")
    assert int(server.requests[1][1][6:-1]) > 0
    assert result.resumed_requests == 1


def test_resume_from_a_part_file_left_by_an_earlier_run(tmp_path, server, payload):
    dest = tmp_path / "model.pth"
    dest.with_name("model.pth.part").write_bytes(payload[:100_000])
    result = download_file(f"{server.url}/model.pth", dest, expected_sha256=sha(payload))
    assert server.requests == [("/model.pth", "bytes=100000-")]
    assert dest.read_bytes() == payload and result.resumed_requests == 1


def test_server_ignoring_range_restarts_from_zero(tmp_path, server, payload):
    server.ignore_range = True
    dest = tmp_path / "model.pth"
    dest.with_name("model.pth.part").write_bytes(b"garbage" * 1000)
    download_file(f"{server.url}/model.pth", dest, expected_sha256=sha(payload))
    assert dest.read_bytes() == payload


def test_complete_part_file_is_verified_without_transfer(tmp_path, server, payload):
    dest = tmp_path / "model.pth"
    dest.with_name("model.pth.part").write_bytes(payload)
    download_file(f"{server.url}/model.pth", dest, expected_sha256=sha(payload))  # server answers 416
    assert dest.read_bytes() == payload


def test_wrong_hash_leaves_nothing_corrupt_and_names_both_hashes(tmp_path, server, payload):
    dest = tmp_path / "model.pth"
    wrong = "0" * 64
    with pytest.raises(ChecksumError) as err:
        download_file(f"{server.url}/model.pth", dest, expected_sha256=wrong)
    message = str(err.value)
    assert "model.pth" in message and wrong in message and sha(payload) in message
    assert not dest.exists() and not dest.with_name("model.pth.part").exists()


def test_wrong_size_is_an_error(tmp_path, server, payload):
    with pytest.raises(ChecksumError, match="size mismatch"):
        download_file(f"{server.url}/model.pth", tmp_path / "m.pth", expected_size=len(payload) + 1)
    assert not (tmp_path / "m.pth").exists()


def test_404_is_a_clear_error(tmp_path, server):
    with pytest.raises(DownloadError, match=r"HTTP 404.*missing\.pth"):
        download_file(f"{server.url}/missing.pth", tmp_path / "missing.pth", retries=0)
    assert not (tmp_path / "missing.pth").exists()


def test_unreachable_host_is_a_clear_error(tmp_path):
    with FileServer({}) as srv:
        url = f"{srv.url}/x.bin"
    # The server is gone: connection refused.
    with pytest.raises(DownloadError, match=r"could not download .*x\.bin"):
        download_file(url, tmp_path / "x.bin", retries=1, backoff_s=0.0, timeout=2)


def test_cut_every_time_keeps_the_part_for_a_later_resume(tmp_path, server, payload):
    server.cut_first.add("/model.pth")
    dest = tmp_path / "model.pth"
    with pytest.raises(DownloadError, match="kept"):
        download_file(f"{server.url}/model.pth", dest, expected_sha256=sha(payload), retries=0)
    part = dest.with_name("model.pth.part")
    assert 0 < part.stat().st_size < len(payload) and not dest.exists()
    download_file(f"{server.url}/model.pth", dest, expected_sha256=sha(payload))
    assert dest.read_bytes() == payload


def test_present_file_is_not_downloaded_again(tmp_path, server, payload):
    dest = tmp_path / "model.pth"
    dest.write_bytes(payload)
    result = download_file(f"{server.url}/model.pth", dest, expected_sha256=sha(payload))
    assert result.already_present and server.requests == []
    assert file_sha256(dest) == sha(payload)


# ------------------------------------------------------------------------------------------------
# Resuming only a piece of the server's current file


@pytest.fixture
def new_version(payload) -> bytes:
    """Another file of the same size (what the server holds after an update)."""
    changed = np.random.default_rng(1).integers(0, 256, len(payload), dtype=np.uint8).tobytes()
    assert FileServer.file_validators(changed) != FileServer.file_validators(payload)
    return changed


def _cut_once(server: FileServer, dest: Path, expected_sha256: str | None = None) -> Path:
    """A first download cut half-way: leaves ``<dest>.part`` (and its validators) behind."""
    server.cut_first.add("/model.pth")
    with pytest.raises(DownloadError, match="kept"):
        download_file(f"{server.url}/model.pth", dest, expected_sha256=expected_sha256, retries=0)
    part = dest.with_name(dest.name + ".part")
    assert part.is_file() and dest.with_name(dest.name + ".part.json").is_file()
    return part


def test_resume_sends_if_range_with_the_etag_of_the_first_answer(tmp_path, server, payload):
    dest = tmp_path / "model.pth"
    _cut_once(server, dest)
    result = download_file(f"{server.url}/model.pth", dest)
    assert dest.read_bytes() == payload and result.resumed_requests == 1
    assert server.if_ranges == [None, FileServer.file_validators(payload)["ETag"]]
    assert not dest.with_name("model.pth.part.json").exists()  # gone with the part


@pytest.mark.parametrize("published_sha256", [False, True])
def test_a_changed_file_after_a_partial_download_restarts_from_zero(
    tmp_path, server, payload, new_version, published_sha256, caplog
):
    dest = tmp_path / "model.pth"
    _cut_once(server, dest, expected_sha256=sha(payload) if published_sha256 else None)
    server.files["/model.pth"] = new_version  # the server publishes another version
    expected = sha(new_version) if published_sha256 else None
    with caplog.at_level(logging.INFO, logger="pipeline.sources.download"):
        result = download_file(f"{server.url}/model.pth", dest, expected_sha256=expected)
    # Not the old part + the new file's tail: If-Range got the whole new file (200).
    assert dest.read_bytes() == new_version and result.resumed_requests == 0
    assert server.requests[-1][1] is not None and server.if_ranges[-1] is not None
    assert "the server sent the whole file" in caplog.text


def test_a_server_ignoring_if_range_with_another_etag_restarts_from_zero(
    tmp_path, server, payload, new_version, caplog
):
    dest = tmp_path / "model.pth"
    _cut_once(server, dest)
    server.files["/model.pth"] = new_version
    server.ignore_if_range = True  # answers 206 for the new version
    with caplog.at_level(logging.INFO, logger="pipeline.sources.download"):
        result = download_file(f"{server.url}/model.pth", dest)
    assert dest.read_bytes() == new_version and result.resumed_requests == 0
    assert server.requests[-1] == ("/model.pth", None)  # the restart asks for the whole file
    assert "the server's file changed since" in caplog.text and "restarting from byte 0" in caplog.text


def test_unverified_part_of_unknown_version_is_not_resumed(tmp_path, server, payload, new_version, caplog):
    # A part left without validators (an older run, or a server that sends none) and no sha256:
    # appending to it could make a corrupt file whose hash gets pinned. It restarts from zero.
    dest = tmp_path / "model.pth"
    dest.with_name("model.pth.part").write_bytes(payload[:100_000])
    server.files["/model.pth"] = new_version
    with caplog.at_level(logging.INFO, logger="pipeline.sources.download"):
        result = download_file(f"{server.url}/model.pth", dest)
    assert server.requests == [("/model.pth", None)]
    assert dest.read_bytes() == new_version and result.resumed_requests == 0
    assert "version of the partial file" in caplog.text and "restarting from byte 0" in caplog.text
    assert "recorded as trust-on-first-use, not verified" in caplog.text


def test_unverified_download_from_a_server_without_validators_never_resumes(tmp_path, server, payload):
    server.validators = False
    server.cut_first.add("/model.pth")
    dest = tmp_path / "model.pth"
    result = download_file(f"{server.url}/model.pth", dest, retries=1, backoff_s=0.0)
    assert dest.read_bytes() == payload and result.resumed_requests == 0
    assert server.requests == [("/model.pth", None), ("/model.pth", None)]
    # With a published sha256 the same cut is resumed: the hash checks the result.
    dest.unlink()
    server.cut_first.add("/model.pth")
    result = download_file(
        f"{server.url}/model.pth", dest, expected_sha256=sha(payload), retries=1, backoff_s=0
    )
    assert dest.read_bytes() == payload and result.resumed_requests == 1


def test_validators_of_another_url_are_not_used(tmp_path, server, payload):
    dest = tmp_path / "model.pth"
    part = _cut_once(server, dest)
    sidecar = part.with_name("model.pth.part.json")
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "url": "http://elsewhere/model.pth"}))
    download_file(f"{server.url}/model.pth", dest)
    assert server.requests[-1] == ("/model.pth", None) and dest.read_bytes() == payload


def test_downloaded_file_has_the_umask_mode(tmp_path, server, payload):
    previous = os.umask(0o027)
    try:
        download_file(f"{server.url}/model.pth", tmp_path / "model.pth", expected_sha256=sha(payload))
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "model.pth").stat().st_mode) == 0o640


# ------------------------------------------------------------------------------------------------
# Archives


def _zip(path: Path, members: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        for name, target in (links or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return path


def _tar(path: Path, members: dict[str, bytes], extra: list[tarfile.TarInfo] = ()) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for info in extra:
            tf.addfile(info)
    return path


def test_extract_zip_strips_a_top_folder_named_like_the_target(tmp_path):
    archive = _zip(
        tmp_path / "DIS5K.zip",
        {"DIS5K/DIS-TR/im/a.jpg": b"a", "DIS5K/DIS-TR/gt/a.png": b"b", "__MACOSX/DIS5K/._a.jpg": b"junk"},
    )
    files = safe_extract(archive, tmp_path / "out" / "DIS5K")
    assert (tmp_path / "out/DIS5K/DIS-TR/im/a.jpg").read_bytes() == b"a"
    assert len(files) == 2 and not (tmp_path / "out/DIS5K/__MACOSX").exists()
    # Without the top folder the layout is the same.
    archive2 = _zip(tmp_path / "flat.zip", {"DIS-TR/im/a.jpg": b"a"})
    safe_extract(archive2, tmp_path / "out2" / "DIS5K")
    assert (tmp_path / "out2/DIS5K/DIS-TR/im/a.jpg").exists()


@pytest.mark.parametrize("evil", ["../evil.txt", "ok/../../evil.txt", "/abs/evil.txt"])
def test_zip_slip_is_refused_before_anything_is_written(tmp_path, evil):
    archive = _zip(tmp_path / "a.zip", {"good.txt": b"g", evil: b"e"})
    with pytest.raises(UnsafeArchiveError, match="evil"):
        safe_extract(archive, tmp_path / "out" / "target")
    assert not (tmp_path / "out" / "target").exists()
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "out" / "evil.txt").exists()
    assert [p.name for p in (tmp_path / "out").iterdir()] == []  # no temporary folder left


def test_zip_symlink_member_is_refused(tmp_path):
    archive = _zip(tmp_path / "a.zip", {"good.txt": b"g"}, links={"link": "/etc/passwd"})
    with pytest.raises(UnsafeArchiveError, match="symbolic link"):
        safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_tar_links_and_slip_are_refused(tmp_path):
    sym = tarfile.TarInfo("sym")
    sym.type, sym.linkname = tarfile.SYMTYPE, "/etc/passwd"
    hard = tarfile.TarInfo("hard")
    hard.type, hard.linkname = tarfile.LNKTYPE, "good.txt"
    for i, extra in enumerate([[sym], [hard]]):
        archive = _tar(tmp_path / f"l{i}.tar.gz", {"good.txt": b"g"}, extra)
        with pytest.raises(UnsafeArchiveError, match="link"):
            safe_extract(archive, tmp_path / f"out{i}")
    archive = _tar(tmp_path / "slip.tar.gz", {"../evil.txt": b"e"})
    with pytest.raises(UnsafeArchiveError, match="outside"):
        safe_extract(archive, tmp_path / "out_slip")
    archive = _tar(tmp_path / "ok.tar.gz", {"d/good.txt": b"g"})
    safe_extract(archive, tmp_path / "out_ok")
    assert (tmp_path / "out_ok/d/good.txt").read_bytes() == b"g"


def test_extract_replaces_an_existing_target(tmp_path):
    target = tmp_path / "t"
    (target / "stale").mkdir(parents=True)
    safe_extract(_zip(tmp_path / "a.zip", {"new.txt": b"n"}), target)
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
