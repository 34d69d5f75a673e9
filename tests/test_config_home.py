"""Configuration has one home: params.yaml sets the pipeline's values, overlays only what differs.

The core (stable_sam/config.py) keeps the configs a library user or a checkpoint needs, with the
method's defaults; the stage sections (pipeline/params.py) have no defaults at all, so a key
params.yaml lacks fails naming it instead of silently taking a second, disagreeing default.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import TEST_ENVIRONMENT

from pipeline import params as pipeline_params
from pipeline import stage_cli
from pipeline.params import Overlay, Params, ParamsError, Variant, load_params, resolved_params_dict
from pipeline.stage_cli import stage_argument_parser
from stable_sam import config
from stable_sam.checkpoint import PLUGIN_CHECKPOINT_FORMAT, read_plugin_checkpoint
from stable_sam.config import (
    OcclusionConfig,
    PluginConfig,
    PromptMixConfig,
    TuningConfig,
    config_from_dict,
    config_to_dict,
)

REPO = Path(__file__).resolve().parent.parent
PARAMS = REPO / "params.yaml"
CLUSTER = REPO / "configs" / "vit_l_hqseg44k.yaml"
CORE_SECTIONS = {
    "plugin": PluginConfig,
    "tuning": TuningConfig,
    "occlusion": OcclusionConfig,
    "train.prompts": PromptMixConfig,
}


def _leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    return {
        k: v
        for key, sub in tree.items()
        for k, v in _leaves(sub, f"{prefix}.{key}" if prefix else key).items()
    }


def _write(tmp_path: Path, tree: dict, name: str = "params.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def _section(tree: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree[part]
    return tree


# ------------------------------------------------------------------------------------------------
# Where each config lives, and its defaults


def test_the_core_keeps_only_what_a_library_user_or_a_checkpoint_needs():
    configs = {
        name
        for name, value in vars(config).items()
        if isinstance(value, type) and dataclasses.is_dataclass(value) and value.__module__ == config.__name__
    }
    assert configs == {
        "PluginConfig",
        "TuningConfig",
        "OcclusionConfig",
        "PromptMixConfig",
        "Allowed",
        "Rule",
    }


def test_the_stage_sections_have_no_defaults():
    sections = [
        value
        for value in vars(pipeline_params).values()
        if isinstance(value, type)
        and dataclasses.is_dataclass(value)
        and value.__module__.startswith(pipeline_params.__name__)  # params, params_eval, _annotator, _base
        and value not in (Variant, Overlay)
    ]
    # sam fetch embedded data synthesize base tighten extend train ray eval ablate tracking automatic
    # interactive + Params
    assert len(sections) == 16
    for section in sections:
        for f in dataclasses.fields(section):
            assert f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING, (
                section,
                f.name,
            )
    with pytest.raises(TypeError):
        Params()


def test_core_defaults_are_the_methods_and_params_yaml_departs_from_them_only_on_purpose():
    """Where params.yaml sets a key of a core config, it uses the core's default, except for the two
    small-SAM choices its comments explain (one plug-in site saturates α1; a 16x16 feature grid)."""
    file = yaml.safe_load(PARAMS.read_text())
    departures = {}
    for where, cls in CORE_SECTIONS.items():
        section = _section(file, where)
        assert set(section) == {f.name for f in dataclasses.fields(cls)}, where  # every key, explicitly
        for key, default in config_to_dict(cls()).items():
            if section[key] != default:
                departures[f"{where}.{key}"] = (default, section[key])
    assert departures == {
        "plugin.placements": (["block2"], ["block1", "block2", "final"]),
        "plugin.offset_bound": (8.0, 3.0),
    }


@pytest.mark.parametrize(
    "key", ["train.epochs", "plugin.offset_bound", "train.prompts.noise_scale", "tracking"]
)
def test_a_key_params_yaml_lacks_fails_naming_it(tmp_path, key):
    """Even a key whose core config has a default: params.yaml lists every key."""
    tree = yaml.safe_load(PARAMS.read_text())
    *parents, leaf = key.split(".")
    del (_section(tree, ".".join(parents)) if parents else tree)[leaf]
    path = _write(tmp_path, tree)
    shown = key if "." in key else "tracking.enabled"  # a whole section: each of its keys
    with pytest.raises(ParamsError, match=rf"^{path}: missing key\(s\) [^:]*\b{shown}\b.*--overlay FILE"):
        load_params(path)


def test_an_unknown_key_in_the_file_fails_naming_the_file_and_the_key(tmp_path):
    tree = yaml.safe_load(PARAMS.read_text())
    tree["train"]["epochz"] = 3
    path = _write(tmp_path, tree)
    with pytest.raises(
        ParamsError, match=rf"^{path}: unknown key 'train.epochz' \(Key 'epochz' not in 'TrainConfig'\)$"
    ):
        load_params(path)


def test_params_round_trip_through_plain_dicts():
    """What the train stage hands its Ray workers (config_to_dict -> config_from_dict)."""
    params = load_params(PARAMS)
    assert config_from_dict(Params, config_to_dict(params)) == params
    values = config_to_dict(params)
    del values["train"]["epochs"]
    with pytest.raises(ValueError, match=r"^config\.train: .*epochs"):
        config_from_dict(Params, values)


def test_a_plugin_checkpoint_written_before_still_loads(tmp_path):
    """The dict the plug-in checkpoint of `dvc repro` recorded before the config moved."""
    recorded = {
        "variant": "dsp", "placements": ["block1", "block2", "final"], "routing": "drp", "fixed_alpha1": 1.0,
        "routing_norm": "softmax", "drp_token": "mask0", "drp_hidden": 32, "offset_bound": 3.0,
        "offset_groups": 1, "offset_kernel": 5, "offset_bias": True, "amplitude": "conv1x1",
        "padding_mode": "border", "resample_pe": False, "replace": "keys_values", "init": "identity",
    }  # fmt: skip
    path = tmp_path / "plugin.pt"
    torch.save(
        {
            "format": PLUGIN_CHECKPOINT_FORMAT,
            "state_dict": {},
            "plugin_config": recorded,
            "tuning": {"decoder": "frozen", "encoder": "frozen", "lora_rank": 4, "adapter_dim": 64},
            "sam_type": "small",
            "sam_checkpoint_sha256": None,
            "package_version": "0.1.0",
            "num_parameters": 0,
            "extra": {},
        },
        path,
    )
    checkpoint = read_plugin_checkpoint(path)
    assert checkpoint.plugin_config == load_params(PARAMS).plugin
    assert config_to_dict(checkpoint.plugin_config) == recorded
    assert checkpoint.tuning == TuningConfig()


# ------------------------------------------------------------------------------------------------
# Overlays


def test_the_cluster_overlay_sets_only_keys_that_differ_from_params_yaml():
    base = _leaves(resolved_params_dict(load_params(PARAMS)))
    overlay = yaml.safe_load(CLUSTER.read_text())
    variants = overlay["ablate"].pop("variants")
    same = {key: value for key, value in _leaves(overlay).items() if base[key] == value}
    assert not same, f"{CLUSTER.name} restates params.yaml: {same}"
    assert variants == {
        "block2_only": None,
        "three_sites": {"plugin.placements": ["block1", "block2", "final"]},
    }


def test_the_cluster_overlay_resolves_to_the_papers_setting():
    base = load_params(PARAMS)
    cluster = load_params(PARAMS, [Overlay(str(CLUSTER))])
    assert (cluster.sam.type, cluster.sam.checkpoint, cluster.sam.sha256) == ("vit_l", None, None)
    assert (cluster.plugin.placements, cluster.plugin.offset_bound) == (["block2"], 8.0)
    assert (cluster.data.train, cluster.data.lsj_min_scale, cluster.data.lsj_max_scale) == (
        ["hqseg44k"],
        0.1,
        2.0,
    )
    assert (cluster.train.epochs, cluster.train.num_points_loss) == (1, 12544)
    assert (cluster.ray.num_workers, cluster.ray.use_gpu) == (8, True)
    # What the overlay does not name is params.yaml's (the small base's pretraining, the sweeps).
    assert (
        cluster.base == base.base
        and cluster.occlusion == base.occlusion
        and cluster.train.prompts == base.train.prompts
    )
    expected = {k: v for k, v in base.ablate.variants.items() if k != "block2_only"}
    expected["three_sites"] = {"plugin.placements": ["block1", "block2", "final"]}
    assert cluster.ablate.variants == expected
    assert load_params(PARAMS, [Overlay(str(CLUSTER)), Variant("three_sites")]).plugin.placements == [
        "block1",
        "block2",
        "final",
    ]
    with pytest.raises(ParamsError, match=r"^--variant block2_only: .* has no ablate\.variants\.block2_only"):
        load_params(PARAMS, [Overlay(str(CLUSTER)), Variant("block2_only")])


def test_overlays_and_sets_apply_in_command_line_order():
    overlay = Overlay(str(CLUSTER))
    assert load_params(PARAMS, [overlay, "ray.num_workers=4"]).ray.num_workers == 4
    assert load_params(PARAMS, ["ray.num_workers=4", overlay]).ray.num_workers == 8
    args = stage_argument_parser("t").parse_args(
        ["--params", str(PARAMS), "--overlay", str(CLUSTER), "--set", "ray.num_workers=4"]
    )
    assert args.overrides == [overlay, "ray.num_workers=4"]
    assert load_params(args.params, args.overrides).ray.num_workers == 4


@pytest.mark.parametrize(
    "overlay, message",
    [
        ({"train": {"epochz": 1}}, "unknown key 'train.epochz' (Key 'epochz' not in 'TrainConfig')"),
        ({"train": {"lr": -0.001}}, "train.lr = -0.001: must be a number > 0"),
        ({"train": {"epochs": "many"}}, "invalid value for 'train.epochs'"),
        (
            {"ablate": {"variants": {"bad": {"plugin.variant": "dspp"}}}},
            "ablate.variants.bad: plugin.variant = 'dspp'",
        ),
    ],
)
def test_a_bad_overlay_fails_naming_the_overlay_and_the_key(tmp_path, overlay, message):
    path = _write(tmp_path, overlay, "overlay.yaml")
    with pytest.raises(ParamsError) as caught:
        load_params(PARAMS, [Overlay(str(path))])
    assert message in str(caught.value)
    assert str(path) in str(caught.value)


def test_a_missing_overlay_is_a_usage_error(capsys):
    parser = stage_argument_parser("t", prog="python -m pipeline.t")
    with pytest.raises(SystemExit) as caught:
        parser.parse_args(["--params", str(PARAMS), "--overlay", "nope.yaml"])
    assert caught.value.code == 2
    assert capsys.readouterr().err == "python -m pipeline.t: error: overlay not found: nope.yaml\n"


def test_python_m_pipeline_params_prints_the_merged_params(tmp_path, capsys):
    assert stage_cli.main(["--params", str(PARAMS), "--overlay", str(CLUSTER)]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    cluster = load_params(PARAMS, [Overlay(str(CLUSTER))])
    assert printed == resolved_params_dict(cluster)
    # ... a complete params file: it loads by itself (how `dvc repro` on a cluster gets its values).
    assert load_params(_write(tmp_path, printed)) == cluster


def test_a_stage_help_names_the_module_it_runs():
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.synthesize", "--help"],
        cwd=REPO,
        env={**TEST_ENVIRONMENT, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(
        "usage: python -m pipeline.synthesize [-h] [--params PARAMS] [--overlay FILE]"
    )
