"""Building Stable-SAM from SAM checkpoints, and self-describing plug-in checkpoints."""

from __future__ import annotations

import pytest
import torch
from conftest import perturb_plugins, random_stable_sam

from stable_sam import build_stable_sam, read_plugin_checkpoint, save_plugin_checkpoint
from stable_sam.build import build_sam
from stable_sam.checkpoint import PLUGIN_CHECKPOINT_FORMAT, SamCheckpointError, file_sha256
from stable_sam.config import PluginConfig, TuningConfig


@pytest.fixture
def sam_checkpoints(tmp_path):
    """Two SAM checkpoints of type tiny (different weights) and one of type small."""
    paths = {}
    for name, sam_type, seed in [("tiny_a", "tiny", 0), ("tiny_b", "tiny", 1), ("small", "small", 0)]:
        _, vanilla = random_stable_sam(sam_type, seed=seed)
        paths[name] = tmp_path / f"{name}.pth"
        torch.save(vanilla.state_dict(), paths[name])
    return paths


def test_checkpoint_is_loaded_strictly_and_hashed(sam_checkpoints):
    sam, sha = build_sam("tiny", sam_checkpoints["tiny_a"])
    assert sha == file_sha256(sam_checkpoints["tiny_a"])
    stored = torch.load(sam_checkpoints["tiny_a"], weights_only=True)
    for name, tensor in sam.state_dict().items():
        assert torch.equal(tensor, stored[name]), name


def test_checkpoint_of_another_type_names_both_types(sam_checkpoints):
    with pytest.raises(SamCheckpointError, match=r"small\.pth is a small SAM checkpoint .* sam_type='tiny'"):
        build_sam("tiny", sam_checkpoints["small"])


def test_official_type_mismatch_is_named(tmp_path):
    with torch.device("meta"):
        state = build_sam("vit_b")[0].state_dict()
    # the architecture-revealing part of a vit_b state dict (zeros), asked for as vit_l
    revealing = {
        k: v for k, v in state.items() if "patch_embed" in k or "iou_token" in k or k.endswith("norm1.weight")
    }
    path = tmp_path / "sam_vit_b.pth"
    torch.save({k: torch.zeros(v.shape) for k, v in revealing.items()}, path)
    with pytest.raises(
        SamCheckpointError, match=r"is a vit_b SAM checkpoint .*encoder width 768.* sam_type='vit_l'"
    ):
        build_sam("vit_l", path)


def test_corrupt_and_truncated_checkpoints_are_clear_errors(tmp_path, sam_checkpoints):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(SamCheckpointError, match=r"cannot read SAM checkpoint .*garbage\.pth"):
        build_sam("tiny", garbage)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(sam_checkpoints["tiny_a"].read_bytes()[:2000])
    with pytest.raises(SamCheckpointError, match=r"truncated\.pth.*corrupt"):
        build_sam("tiny", truncated)
    with pytest.raises(SamCheckpointError, match="not found"):
        build_sam("tiny", tmp_path / "missing.pth")


def test_missing_keys_are_a_clear_error(tmp_path, sam_checkpoints):
    state = torch.load(sam_checkpoints["tiny_a"], weights_only=True)
    del state["mask_decoder.iou_token.weight"]
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(SamCheckpointError, match=r"partial\.pth"):
        build_sam("tiny", path)


def test_plugin_checkpoint_roundtrip_holds_only_plugin_weights_and_describes_itself(
    tmp_path, sam_checkpoints
):
    model = build_stable_sam(sam_type="tiny", sam_checkpoint=sam_checkpoints["tiny_a"])
    perturb_plugins(model)
    path = tmp_path / "plugin.pt"
    save_plugin_checkpoint(model, path, extra={"step": 7})
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == PLUGIN_CHECKPOINT_FORMAT
    assert set(payload["state_dict"]) == set(model.trainable_parameter_names())
    assert payload["sam_type"] == "tiny"
    assert payload["sam_checkpoint_sha256"] == file_sha256(sam_checkpoints["tiny_a"])
    assert payload["package_version"] and payload["plugin_config"]["offset_bound"] == 8.0
    assert payload["extra"] == {"step": 7}
    assert path.stat().st_size < 200_000

    loaded = build_stable_sam(
        sam_type="tiny", sam_checkpoint=sam_checkpoints["tiny_a"], plugin_checkpoint=path
    )
    for name, tensor in model.trainable_state_dict().items():
        assert torch.equal(loaded.trainable_state_dict()[name], tensor)
    assert read_plugin_checkpoint(path).num_parameters == model.num_trainable_parameters()


def test_plugin_config_comes_from_the_checkpoint(tmp_path, sam_checkpoints):
    config = PluginConfig(offset_bound=3.0, drp_hidden=16)
    model = build_stable_sam(sam_type="tiny", sam_checkpoint=sam_checkpoints["tiny_a"], plugin_config=config)
    save_plugin_checkpoint(model, tmp_path / "p.pt")
    loaded = build_stable_sam(
        sam_type="tiny", sam_checkpoint=sam_checkpoints["tiny_a"], plugin_checkpoint=tmp_path / "p.pt"
    )
    assert loaded.plugin_config == config
    with pytest.raises(ValueError, match="plugin_config differs"):
        build_stable_sam(
            sam_type="tiny",
            sam_checkpoint=sam_checkpoints["tiny_a"],
            plugin_checkpoint=tmp_path / "p.pt",
            plugin_config=PluginConfig(),
        )


def test_plugin_checkpoint_on_a_mismatched_sam_is_a_clear_error(tmp_path, sam_checkpoints):
    model = build_stable_sam(sam_type="tiny", sam_checkpoint=sam_checkpoints["tiny_a"])
    save_plugin_checkpoint(model, tmp_path / "p.pt")
    with pytest.raises(SamCheckpointError, match="trained on the SAM checkpoint with sha256"):
        build_stable_sam(
            sam_type="tiny", sam_checkpoint=sam_checkpoints["tiny_b"], plugin_checkpoint=tmp_path / "p.pt"
        )
    with pytest.raises(SamCheckpointError, match="trained on a 'tiny' SAM, this model is 'small'"):
        build_stable_sam(
            sam_type="small", sam_checkpoint=sam_checkpoints["small"], plugin_checkpoint=tmp_path / "p.pt"
        )
    with pytest.raises(SamCheckpointError, match=r"not a Stable-SAM plug-in checkpoint.*SAM checkpoint"):
        build_stable_sam(sam_type="tiny", plugin_checkpoint=sam_checkpoints["tiny_a"])


def test_plugin_checkpoint_with_wrong_tensors_is_rejected(tmp_path):
    model, _ = random_stable_sam("tiny")
    save_plugin_checkpoint(model, tmp_path / "p.pt")
    payload = torch.load(tmp_path / "p.pt", weights_only=True)
    first = next(iter(payload["state_dict"]))
    payload["state_dict"][first] = torch.zeros(3)
    torch.save(payload, tmp_path / "bad_shape.pt")
    with pytest.raises(SamCheckpointError, match="has shape"):
        build_stable_sam(sam_type="tiny", plugin_checkpoint=tmp_path / "bad_shape.pt")
    del payload["state_dict"][first]
    torch.save(payload, tmp_path / "missing.pt")
    with pytest.raises(SamCheckpointError, match="missing"):
        build_stable_sam(sam_type="tiny", plugin_checkpoint=tmp_path / "missing.pt")


def test_tuning_variant_checkpoint_holds_its_extra_weights(tmp_path):
    tuning = TuningConfig(encoder="lora", decoder="prediction_head")
    model = build_stable_sam(sam_type="tiny", plugin_config=PluginConfig(variant="none"), tuning=tuning)
    save_plugin_checkpoint(model, tmp_path / "lora.pt")
    ckpt = read_plugin_checkpoint(tmp_path / "lora.pt")
    assert ckpt.tuning == tuning
    assert any("lora_a" in k for k in ckpt.state_dict)
    loaded = build_stable_sam(sam_type="tiny", plugin_checkpoint=tmp_path / "lora.pt")
    assert loaded.tuning == tuning


def test_weights_read_once_build_the_same_sam_and_survive_pickling(sam_checkpoints):
    # The train stage's driver reads and hashes the checkpoint once and ships SamWeights to its
    # workers through Ray's object store (a pickle): they must build the very same SAM.
    import pickle

    from stable_sam.build import SamWeights

    weights = pickle.loads(pickle.dumps(SamWeights.read(sam_checkpoints["tiny_a"])))
    assert weights.sha256 == file_sha256(sam_checkpoints["tiny_a"])
    from_weights, sha = build_sam("tiny", weights)
    from_file, _ = build_sam("tiny", sam_checkpoints["tiny_a"])
    assert sha == weights.sha256
    for name, tensor in from_file.state_dict().items():
        assert torch.equal(tensor, from_weights.state_dict()[name]), name
    model = build_stable_sam(sam_type="tiny", sam_checkpoint=weights)
    assert model.sam_checkpoint_sha256 == weights.sha256
    with pytest.raises(SamCheckpointError, match=r"small\.pth is a small SAM checkpoint"):
        build_sam("tiny", SamWeights.read(sam_checkpoints["small"]))
