"""The fetch stage (run) and the raw-data manifest, offline: embedded data, a local HTTP server, local files."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import PARAMS_FILE, repo_params
from PIL import Image
from test_download import FileServer

from pipeline import raw_data
from pipeline.fetch import FetchError, FetchPaths, main, run
from pipeline.params import Params
from pipeline.raw_data import RawDataError, load_file_manifest, read_raw_manifest
from stable_sam.config import ConfigError, check_config


def _params(**fetch) -> Params:
    return repo_params(
        fetch=fetch,
        embedded=dict(num_train=6, num_val=3, image_size=48, min_objects=2, max_objects=3, seed=1),
    )


def _jpg(seed: int, size=(16, 20)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)).save(
        buffer, "JPEG"
    )
    return buffer.getvalue()


def _png(empty: bool = False, size=(16, 20)) -> bytes:
    mask = np.zeros(size, np.uint8)
    if not empty:
        mask[4:10, 5:12] = 255
    buffer = io.BytesIO()
    Image.fromarray(mask).save(buffer, "PNG")
    return buffer.getvalue()


def _dis5k_zip() -> bytes:
    """A miniature DIS5K.zip: 2 train pairs (one with an empty mask, one corrupt image) and 1 val pair."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("DIS5K/DIS-TR/im/a.jpg", _jpg(0))
        zf.writestr("DIS5K/DIS-TR/gt/a.png", _png())
        zf.writestr("DIS5K/DIS-TR/im/b.jpg", _jpg(1))
        zf.writestr("DIS5K/DIS-TR/gt/b.png", _png(empty=True))
        zf.writestr("DIS5K/DIS-TR/im/c.jpg", b"not a jpeg")
        zf.writestr("DIS5K/DIS-TR/gt/c.png", _png())
        zf.writestr("DIS5K/DIS-VD/im/v.jpg", _jpg(2))
        zf.writestr("DIS5K/DIS-VD/gt/v.png", _png())
    return buffer.getvalue()


def _manifest(tmp_path: Path, base_url: str, files: dict[str, bytes], sha_overrides=None) -> Path:
    sha = {name: hashlib.sha256(body).hexdigest() for name, body in files.items()}
    sha.update(sha_overrides or {})
    content = {
        "items": {
            "sam_vit_b": {
                "kind": "checkpoint",
                "sam_type": "vit_b",
                "filename": "ckpt.pth",
                "url": f"{base_url}/ckpt.pth",
                "bytes": len(files["ckpt.pth"]),
                "sha256": sha["ckpt.pth"],
            },
            "hqseg44k_dis5k": {
                "kind": "archive",
                "dataset": "hqseg44k",
                "filename": "DIS5K.zip",
                "url": f"{base_url}/DIS5K.zip",
                "bytes": len(files["DIS5K.zip"]),
                "sha256": sha["DIS5K.zip"],
                "extract_to": "hqseg44k/DIS5K",
                "expect": ["DIS-TR/im", "DIS-VD/gt"],
            },
        },
        "groups": {"hqseg44k": ["hqseg44k_dis5k"]},
        "dataset_roots": {"hqseg44k": "hqseg44k"},
    }
    path = tmp_path / "test_manifest.json"
    path.write_text(json.dumps(content))
    return path


@pytest.fixture
def files() -> dict[str, bytes]:
    return {"ckpt.pth": b"weights" * 5000, "DIS5K.zip": _dis5k_zip()}


def test_embedded_source_writes_dataset_and_manifest(tmp_path):
    out = tmp_path / "raw"
    metrics = run(_params(source="embedded"), FetchPaths(out))
    assert metrics["embedded_train_images"] == 6 and metrics["embedded_val_images"] == 3
    assert metrics["skipped_files"] == 0 and metrics["embedded_train_mb"] > 0
    manifest = read_raw_manifest(out)
    assert manifest.source == "embedded"
    assert manifest.dataset_root("embedded") == out / "embedded"
    assert manifest.content["datasets"]["embedded"]["root"] == "embedded"  # relative: relocatable
    assert manifest.content["seeds"]["embedded"] == 1
    train = manifest.open_dataset("embedded", split="train")
    assert len(train) == 6 and train[0].instances is not None
    assert manifest.checkpoint("vit_b") is None


def test_remote_download_verify_extract_and_rerun_is_a_no_op(tmp_path, files):
    with FileServer({f"/{k}": v for k, v in files.items()}) as server:
        file_manifest = load_file_manifest(_manifest(tmp_path, server.url, files))
        out = tmp_path / "raw"
        params = _params(source="remote", items=["embedded", "sam_vit_b", "hqseg44k"])
        metrics = run(params, FetchPaths(out), file_manifest=file_manifest)
        assert metrics["checkpoints"] == 1 and metrics["downloaded_mb"] > 0
        assert len(server.requests) == 2
        manifest = read_raw_manifest(out)
        path, digest = manifest.require_checkpoint("vit_b")
        assert (
            path == out / "downloads" / "ckpt.pth" and digest == hashlib.sha256(files["ckpt.pth"]).hexdigest()
        )
        assert not (out / "downloads" / "DIS5K.zip").exists()  # extracted, archive removed
        # Extracted beside the downloads, outside the DVC output (data/raw holds the manifest).
        extracted = out / "downloads" / "extracted" / "hqseg44k"
        assert (extracted / "DIS5K" / "DIS-TR" / "im" / "a.jpg").is_file()
        assert manifest.dataset_root("DIS-VD") == extracted
        # Bad files found once at fetch time, with their reasons, then excluded downstream.
        skipped = manifest.content["skipped"]["hqseg44k"]
        reasons = {Path(s["path"]).name: s["reason"] for s in skipped}
        assert set(reasons) == {"b.jpg", "c.jpg"} and "empty mask" in reasons["b.jpg"]
        assert manifest.content["datasets"]["hqseg44k"]["sets"]["DIS5K-TR"]["valid_pairs"] == 1
        train = manifest.open_dataset("DIS5K-TR", split="train", validate="none")
        assert [p.name for p in train.pairs] == ["a"]
        assert len(manifest.open_dataset("DIS-VD", split="val")) == 1
        # A rerun verifies what is there and downloads nothing.
        run(params, FetchPaths(out), file_manifest=file_manifest)
        assert len(server.requests) == 2


def test_no_network_says_what_and_where(tmp_path, files):
    with FileServer({}) as server:
        url = server.url
    file_manifest = load_file_manifest(_manifest(tmp_path, url, files))
    out = tmp_path / "raw"
    params = _params(source="remote", items=["sam_vit_b", "hqseg44k"], retries=0, timeout_s=2)
    with pytest.raises(FetchError) as err:
        run(params, FetchPaths(out), file_manifest=file_manifest)
    message = str(err.value)
    assert f"{url}/ckpt.pth" in message and f"{url}/DIS5K.zip" in message
    assert str(out / "downloads" / "ckpt.pth") in message and str(out / "downloads" / "DIS5K.zip") in message
    assert "fetch.source=local" in message and "fetch.source=embedded" in message
    assert "hqseg44k/DIS5K" in message and "DIS-TR/im" in message


def test_wrong_hash_fails_and_keeps_nothing(tmp_path, files):
    with FileServer({f"/{k}": v for k, v in files.items()}) as server:
        file_manifest = load_file_manifest(_manifest(tmp_path, server.url, files, {"ckpt.pth": "ab" * 32}))
        with pytest.raises(FetchError, match="sha256 mismatch") as err:
            run(
                _params(source="remote", items=["sam_vit_b"]),
                FetchPaths(tmp_path / "raw"),
                file_manifest=file_manifest,
            )
    assert "ab" * 32 in str(err.value) and hashlib.sha256(files["ckpt.pth"]).hexdigest() in str(err.value)
    assert list((tmp_path / "raw" / "downloads").iterdir()) == []


def test_unpublished_hash_needs_explicit_trust(tmp_path, files):
    with FileServer({f"/{k}": v for k, v in files.items()}) as server:
        manifest_path = _manifest(tmp_path, server.url, files)
        content = json.loads(manifest_path.read_text())
        content["items"]["sam_vit_b"]["sha256"] = None
        manifest_path.write_text(json.dumps(content))
        file_manifest = load_file_manifest(manifest_path)
        with pytest.raises(FetchError, match=r"fetch\.trust_unverified=\[sam_vit_b\]"):
            run(
                _params(source="remote", items=["sam_vit_b"]),
                FetchPaths(tmp_path / "a"),
                file_manifest=file_manifest,
            )
        assert server.requests == []  # refused before downloading
        params = _params(source="remote", items=["sam_vit_b"], trust_unverified=["sam_vit_b"])
        # A downloads folder beside the raw folder (outside the DVC output) is stored relatively.
        run(params, FetchPaths(tmp_path / "b", downloads=tmp_path / "downloads"), file_manifest=file_manifest)
    manifest = read_raw_manifest(tmp_path / "b")
    entry = manifest.content["checkpoints"]["vit_b"]
    assert entry["verified"] == "trusted_first_download" and entry["path"] == "../downloads/ckpt.pth"
    assert manifest.require_checkpoint("vit_b")[0] == tmp_path / "downloads" / "ckpt.pth"
    # The first hash is pinned: a later run verifies against it (here a changed file fails).
    assert (tmp_path / "downloads" / "ckpt.pth.sha256").read_text().strip() == entry["sha256"]
    (tmp_path / "downloads" / "ckpt.pth").unlink()
    with FileServer({"/ckpt.pth": b"changed upstream"}) as server2:
        content["items"]["sam_vit_b"]["url"] = f"{server2.url}/ckpt.pth"
        content["items"]["sam_vit_b"]["bytes"] = None
        manifest_path.write_text(json.dumps(content))
        with pytest.raises(FetchError, match="sha256 mismatch"):
            run(
                params,
                FetchPaths(tmp_path / "b", downloads=tmp_path / "downloads"),
                file_manifest=load_file_manifest(manifest_path),
            )
    assert entry["sha256"] == hashlib.sha256(files["ckpt.pth"]).hexdigest()


def test_local_source_uses_files_in_place(tmp_path, files):
    local = tmp_path / "mine"
    local.mkdir()
    (local / "ckpt.pth").write_bytes(files["ckpt.pth"])
    with zipfile.ZipFile(io.BytesIO(files["DIS5K.zip"])) as zf:
        zf.extractall(local / "hqseg44k")
    file_manifest = load_file_manifest(_manifest(tmp_path, "http://127.0.0.1:9", files))
    out = tmp_path / "raw"
    params = _params(source="local", local_root=str(local), items=["sam_vit_b", "hqseg44k"])
    run(params, FetchPaths(out), file_manifest=file_manifest)
    manifest = read_raw_manifest(out)
    assert manifest.require_checkpoint("vit_b")[0] == (local / "ckpt.pth").resolve()
    assert manifest.dataset_root("DIS-VD") == (local / "hqseg44k").resolve()
    assert not (out / "downloads").exists()
    # A wrong local file is an error naming both hashes; a missing one names the expected path.
    (local / "ckpt.pth").write_bytes(b"other")
    with pytest.raises(FetchError, match=r"ckpt\.pth has sha256"):
        run(params, FetchPaths(out), file_manifest=file_manifest)
    (local / "ckpt.pth").unlink()
    with pytest.raises(FetchError, match=str(local / "ckpt.pth")):
        run(params, FetchPaths(out), file_manifest=file_manifest)


def test_bad_params_are_clear_errors(tmp_path):
    # Choices are validated once, where params are loaded (stable_sam.config.check_config).
    with pytest.raises(ConfigError, match=r"fetch\.source = 'ftp': must be one of"):
        check_config(_params(source="ftp"))
    with pytest.raises(FetchError, match="unknown item 'sam_vit_x'"):
        run(_params(source="remote", items=["sam_vit_x"]), FetchPaths(tmp_path))
    with pytest.raises(FetchError, match=r"needs fetch\.local_root"):
        run(_params(source="local", items=["sam_vit_b"]), FetchPaths(tmp_path))
    with pytest.raises(FetchError, match="nothing to fetch"):
        run(_params(source="remote"), FetchPaths(tmp_path))


def test_raw_manifest_errors_say_how_to_get_the_data(tmp_path):
    with pytest.raises(RawDataError, match="run the fetch stage"):
        read_raw_manifest(tmp_path)
    run(_params(source="embedded"), FetchPaths(tmp_path))
    manifest = read_raw_manifest(tmp_path)
    with pytest.raises(RawDataError) as err:
        manifest.dataset_root("DIS-VD")
    message = str(err.value)
    assert "fetch.items=[hqseg44k]" in message and str(tmp_path / "downloads" / "DIS5K.zip") in message
    assert "hqseg44k/thin_object_detection" in message and "fetch.source=local" in message
    with pytest.raises(RawDataError) as err:
        manifest.require_checkpoint("vit_l")
    assert "sam_vit_l_0b3195.pth" in str(err.value) and "3adcc4315b642a4d" in str(err.value)


def test_repository_file_manifest_matches_the_published_values():
    manifest = load_file_manifest()
    published = {
        "sam_vit_b": (375042383, "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912"),
        "sam_vit_l": (1249524607, "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622"),
        "sam_vit_h": (2564550879, "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e"),
        "hqseg44k_dis5k": (3529707387, "881e4668606548c4ed4e3cf429d65962ae5c7710d97d99759889b2ebd95a03f0"),
        "hqseg44k_cascade_psp": (
            1365490019,
            "5191a51fa482d997a9e5234b12fbcacaf7979af70be489496f2ac8c611e9b46a",
        ),
        "hqseg44k_thin_object": (
            2445237905,
            "133b9916eee3b9a38d87c8cbdc556962d42c36ec9e9fe9bb42b2ceebbe7200d2",
        ),
    }
    for name, (size, sha) in published.items():
        assert (manifest.items[name].bytes, manifest.items[name].sha256) == (size, sha)
    assert {manifest.items[n].sam_type for n in manifest.groups["sam_checkpoints"]} == {
        "vit_b",
        "vit_l",
        "vit_h",
    }
    assert [i.name for i in manifest.expand(["hqseg44k", "coco_val2017"])] == [
        "hqseg44k_dis5k",
        "hqseg44k_cascade_psp",
        "hqseg44k_thin_object",
        "coco_val2017_images",
        "coco_annotations_2017",
    ]
    # Every folder the dataset registry needs is promised by some archive's 'expect'.
    promised = {
        f"{Path(i.extract_to).name}/{e}" for i in manifest.dataset_items("hqseg44k") for e in i.expect
    }
    from stable_sam.data import HQSEG44K_TRAIN, HQSEG_EVAL

    for spec in (*HQSEG44K_TRAIN, *HQSEG_EVAL):
        assert any(
            spec.im_dir == p or spec.im_dir.startswith(p + "/") or p.startswith(spec.im_dir) for p in promised
        ), spec


def test_main_runs_offline_without_tracking(tmp_path):
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(
        "tracking:\n  enabled: false\nembedded:\n  num_train: 2\n  num_val: 1\n  image_size: 32\n"
    )
    main(
        [
            "--params",
            str(PARAMS_FILE),
            "--overlay",
            str(overlay),
            "--out",
            str(tmp_path / "raw"),
            "--set",
            "embedded.seed=5",
        ]
    )
    manifest = raw_data.read_raw_manifest(tmp_path / "raw")
    assert manifest.content["seeds"]["embedded"] == 5


def _local_dis5k(local: Path, *, vd_strays_only: bool = False) -> None:
    """DIS-TR: 2 good pairs, a stray mask, an image without a mask, an oversized image; DIS-VD: 1 pair."""
    tr, vd = local / "hqseg44k" / "DIS5K" / "DIS-TR", local / "hqseg44k" / "DIS5K" / "DIS-VD"
    for folder in (tr / "im", tr / "gt", vd / "im", vd / "gt"):
        folder.mkdir(parents=True)
    for stem, seed in (("a", 0), ("b", 1)):
        (tr / "im" / f"{stem}.jpg").write_bytes(_jpg(seed))
        (tr / "gt" / f"{stem}.png").write_bytes(_png())
    (tr / "gt" / "stray.png").write_bytes(_png())
    (tr / "im" / "lonely.jpg").write_bytes(_jpg(3))
    (tr / "im" / "huge.jpg").write_bytes(_jpg(4, size=(64, 64)))
    (tr / "gt" / "huge.png").write_bytes(_png(size=(64, 64)))
    (vd / "im" / "v.jpg").write_bytes(_jpg(2))
    (vd / "gt" / ("w.png" if vd_strays_only else "v.png")).write_bytes(_png())


def test_stray_and_oversized_files_are_skipped_named_and_counted(tmp_path, files, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # huge.jpg: 4096 > 2 x 1000 pixels
    local = tmp_path / "mine"
    _local_dis5k(local)
    (local / "ckpt.pth").write_bytes(files["ckpt.pth"])
    file_manifest = load_file_manifest(_manifest(tmp_path, "http://127.0.0.1:9", files))
    out = tmp_path / "raw"
    params = _params(source="local", local_root=str(local), items=["hqseg44k"])
    metrics = run(params, FetchPaths(out), file_manifest=file_manifest)
    assert metrics["DIS5K-TR_pairs"] == 2 and metrics["DIS-VD_pairs"] == 1
    assert metrics["skipped_files"] == 3 and metrics["unmatched_files"] == 2
    manifest = read_raw_manifest(out)
    tr = manifest.content["datasets"]["hqseg44k"]["sets"]["DIS5K-TR"]
    assert tr == {"split": "train", "valid_pairs": 2, "skipped": 3, "unmatched": 2}
    assert manifest.content["counts"]["unmatched_files"] == 2
    reasons = {Path(s["path"]).name: s["reason"] for s in manifest.content["skipped"]["hqseg44k"]}
    assert reasons["stray.png"].startswith("mask without a .jpg image in ")
    assert reasons["lonely.jpg"].startswith("image without a .png mask in ")
    assert reasons["huge.jpg"].startswith("image is over Pillow's decompression-bomb limit")
    assert "Image.MAX_IMAGE_PIXELS = 1000" in reasons["huge.jpg"]
    # Later stages open the set (header check + the manifest's skip list) with the same record.
    train = manifest.open_dataset("DIS5K-TR", split="train")
    assert train.validate == "header" and [p.name for p in train.pairs] == ["a", "b"]
    assert {Path(s.path).name for s in train.skipped} == set(reasons)


def test_a_set_with_nothing_left_fails_the_stage_naming_its_folders(tmp_path, files):
    local = tmp_path / "mine"
    _local_dis5k(local, vd_strays_only=True)
    file_manifest = load_file_manifest(_manifest(tmp_path, "http://127.0.0.1:9", files))
    params = _params(source="local", local_root=str(local), items=["hqseg44k"])
    with pytest.raises(FetchError) as err:
        run(params, FetchPaths(tmp_path / "raw"), file_manifest=file_manifest)
    message = str(err.value)
    vd = local / "hqseg44k" / "DIS5K" / "DIS-VD"
    assert "DIS-VD: no .jpg images with .png masks" in message and str(vd / "im") in message
    assert "2 stray file(s) without a partner: v.jpg, w.png" in message
    assert "DIS5K-TR" not in message


def test_later_stages_decode_check_what_fetch_did_not(tmp_path):
    """A folder path (e.g. in data.val) is opened with a full decode check, a fetched set is not."""
    run(_params(source="embedded"), FetchPaths(tmp_path / "raw"))
    manifest = read_raw_manifest(tmp_path / "raw")
    assert manifest.open_dataset("embedded", split="val").validate == "header"
    mine = tmp_path / "mine"
    (mine / "im").mkdir(parents=True)
    (mine / "gt").mkdir()
    for stem, seed in (("a", 0), ("b", 1), ("c", 2)):
        (mine / "im" / f"{stem}.jpg").write_bytes(_jpg(seed, size=(64, 80)))
        (mine / "gt" / f"{stem}.png").write_bytes(_png(size=(64, 80)))
    body = (mine / "im" / "b.jpg").read_bytes()
    (mine / "im" / "b.jpg").write_bytes(body[: len(body) // 2])  # header fine, pixels truncated
    ds = manifest.open_dataset(str(mine), split="val")
    assert ds.validate == "full" and [ds[i].name for i in range(len(ds))] == ["a", "c"]
    assert [s.path for s in ds.skipped] == [str(mine / "im" / "b.jpg")]


def test_a_rerun_after_dvc_deleted_the_raw_folder_downloads_nothing(tmp_path, files):
    # `dvc repro` deletes data/raw (the output) before rerunning fetch after any change to its
    # code or params; the downloads folder beside it is not an output: the extracted archives
    # there are verified and reused, even with keep_archives=false (the zip is gone).
    import shutil

    with FileServer({f"/{k}": v for k, v in files.items()}) as server:
        file_manifest = load_file_manifest(_manifest(tmp_path, server.url, files))
        raw, downloads = tmp_path / "data" / "raw", tmp_path / "data" / "downloads"
        params = _params(source="remote", items=["sam_vit_b", "hqseg44k"])
        run(params, FetchPaths(raw, downloads=downloads), file_manifest=file_manifest)
        first = read_raw_manifest(raw).content
        requests = len(server.requests)
        shutil.rmtree(raw)
        run(params, FetchPaths(raw, downloads=downloads), file_manifest=file_manifest)
        assert len(server.requests) == requests
        manifest = read_raw_manifest(raw)
        assert manifest.content["datasets"] == first["datasets"]
        assert manifest.content["datasets"]["hqseg44k"]["root"] == "../downloads/extracted/hqseg44k"
        assert len(manifest.open_dataset("DIS-VD", split="val")) == 1
