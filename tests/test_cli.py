"""The ``stable-sam`` command line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import random_stable_sam
from PIL import Image

from stable_sam import save_plugin_checkpoint
from stable_sam.cli import main


@pytest.fixture
def files(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (48, 60, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "cat.jpg")
    model, vanilla = random_stable_sam("tiny")
    torch.save(vanilla.state_dict(), tmp_path / "sam_tiny.pth")
    from stable_sam import build_stable_sam

    plugged = build_stable_sam(sam_type="tiny", sam_checkpoint=tmp_path / "sam_tiny.pth")
    save_plugin_checkpoint(plugged, tmp_path / "plugin.pt")
    del model
    return tmp_path


def test_predict_with_box_writes_mask_and_overlay(files, capsys):
    code = main(
        [
            "predict", str(files / "cat.jpg"), "--box", "5,4,40,30", "--sam-type", "tiny",
            "--sam-checkpoint", str(files / "sam_tiny.pth"), "--plugin", str(files / "plugin.pt"),
            "--out-dir", str(files / "out"),
        ]
    )  # fmt: skip
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    mask = np.asarray(Image.open(files / "out" / "cat_mask.png"))
    overlay = Image.open(files / "out" / "cat_overlay.png")
    assert mask.shape == (48, 60) and set(np.unique(mask)) <= {0, 255}
    assert overlay.size == (60, 48)
    assert summary["area_pixels"] == int((mask > 0).sum())
    assert summary["alpha"] == [0.5, 0.5]  # untrained DRP


def test_predict_with_labelled_points(files, capsys):
    args = [
        "predict",
        str(files / "cat.jpg"),
        "--point",
        "20,15",
        "--point",
        "50,40",
        "--label",
        "1",
        "--label",
        "0",
    ]
    args += [
        "--sam-type",
        "tiny",
        "--sam-checkpoint",
        str(files / "sam_tiny.pth"),
        "--out-dir",
        str(files / "o"),
    ]
    assert main(args) == 0
    assert (files / "o" / "cat_overlay.png").is_file()


def _predict_cat(files) -> list[str]:
    """``stable-sam predict cat.jpg`` on the fixture's tiny SAM, prompts to be added."""
    return [
        "predict",
        str(files / "cat.jpg"),
        "--sam-type",
        "tiny",
        "--sam-checkpoint",
        str(files / "sam_tiny.pth"),
    ]


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["--box", "100,4,400,30"],
            r"--box: box \[100.0, 4.0, 400.0, 30.0\] does not overlap the 60x48 image",
        ),
        (["--box", "40,4,5,30"], "x1 < x0"),
        (["--point", "5,4", "--point", "6,6", "--label", "1"], "one label per point"),
        ([], "give a prompt"),
    ],
)
def test_bad_arguments_are_clear_errors(files, extra, message):
    args = _predict_cat(files)
    with pytest.raises(SystemExit, match=message):
        main(args + extra + ["--out-dir", str(files / "o")])


def test_unreadable_image_and_wrong_checkpoint_are_clear_errors(files):
    (files / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(SystemExit, match="cannot read image"):
        main(["predict", str(files / "broken.jpg"), "--box", "1,1,5,5", "--sam-type", "tiny"])
    with pytest.raises(SystemExit, match="is a tiny SAM checkpoint"):
        main(
            [
                "predict",
                str(files / "cat.jpg"),
                "--box",
                "1,1,5,5",
                "--sam-type",
                "small",
                "--sam-checkpoint",
                str(files / "sam_tiny.pth"),
            ]
        )


def test_a_loose_box_is_clipped_to_the_image_and_said_so(files, capsys, caplog):
    args = _predict_cat(files)
    with caplog.at_level("WARNING"):
        assert main([*args, "--box=-5,4,400,30", "--out-dir", str(files / "loose")]) == 0
    assert (
        "box [-5.0, 4.0, 400.0, 30.0] reaches outside the 60x48 image (W x H); clipped to [0.0, 4.0, 60.0, 30.0]"
        in caplog.text
    )
    loose = json.loads(capsys.readouterr().out)
    assert loose["box"] == [0.0, 4.0, 60.0, 30.0]
    assert main([*args, "--box", "0,4,60,30", "--out-dir", str(files / "tight")]) == 0
    tight = json.loads(capsys.readouterr().out)
    assert loose["predicted_iou"] == tight["predicted_iou"]
    assert np.array_equal(
        np.asarray(Image.open(files / "loose" / "cat_mask.png")),
        np.asarray(Image.open(files / "tight" / "cat_mask.png")),
    )


def test_an_oversized_image_is_a_clear_error_naming_the_file_and_the_limit(files, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # cat.jpg: 60 x 48 = 2880 > 2 x 1000 pixels
    with pytest.raises(SystemExit) as err:
        main(["predict", str(files / "cat.jpg"), "--box", "1,1,5,5", "--sam-type", "tiny"])
    assert err.value.code == (
        f"error: cannot read image {files / 'cat.jpg'}: Image size (2880 pixels) exceeds limit of 2000 pixels, "
        "could be decompression bomb DOS attack. Pillow refuses images over its decompression-bomb limit, "
        "2 x Image.MAX_IMAGE_PIXELS = 2000 pixels"
    )


def test_info_prints_the_parameter_count(capsys):
    assert main(["info", "--sam-type", "tiny"]) == 0
    assert "trainable (plug-in): 3,204" in capsys.readouterr().out


def test_info_describes_a_plugin_file_with_its_own_config(files, capsys):
    from stable_sam import PluginConfig, build_stable_sam

    config = PluginConfig(placements=("block1", "block2", "final"))
    plugged = build_stable_sam(sam_type="tiny", sam_checkpoint=files / "sam_tiny.pth", plugin_config=config)
    save_plugin_checkpoint(plugged, files / "three.pt", extra={"steps": 7})
    assert main(["info", "--sam-type", "tiny"]) == 0
    default = capsys.readouterr().out
    assert main(["info", "--plugin", str(files / "three.pt")]) == 0
    described = capsys.readouterr().out
    count = f"trainable (plug-in): {plugged.num_trainable_parameters():,}"
    assert count in described and count not in default  # three placements, not the default one
    assert "steps: 7" in described and plugged.sam_checkpoint_sha256 in described


def test_a_plugin_without_its_sam_checkpoint_names_the_checkpoint_it_needs(files):
    from stable_sam.checkpoint import read_plugin_checkpoint

    expected = read_plugin_checkpoint(files / "plugin.pt").sam_checkpoint_sha256
    with pytest.raises(SystemExit, match=f"needs --sam-checkpoint.*sha256 {expected}"):
        main(["predict", str(files / "cat.jpg"), "--box", "5,4,40,30", "--sam-type", "tiny",
              "--plugin", str(files / "plugin.pt")])  # fmt: skip


def test_predict_encoder_precision_reaches_the_model(files, capsys):
    """fp32 then bf16 on one --cache-dir: two entries (the cache keys the precision), two masks."""
    base = [
        "predict", str(files / "cat.jpg"), "--box", "5,4,40,30", "--sam-type", "tiny",
        "--sam-checkpoint", str(files / "sam_tiny.pth"), "--cache-dir", str(files / "cache"),
    ]  # fmt: skip
    for precision in ("fp32", "bf16", "bf16"):
        assert main([*base, "--encoder-precision", precision, "--out-dir", str(files / precision)]) == 0
    assert len(list((files / "cache").rglob("*.pt"))) == 2
    assert (files / "bf16" / "cat_mask.png").is_file()
    with pytest.raises(SystemExit) as caught:
        main([*base, "--encoder-precision", "fp8"])
    assert caught.value.code == 2 and "invalid choice: 'fp8'" in capsys.readouterr().err
