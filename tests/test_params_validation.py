"""Every params value is checked when params load, and variants never reach a shell.

Issue 13 ("every bad input is named early"): a value outside what its key allows (declared once,
next to the key: stable_sam/config.py for the core's configs, pipeline/params.py for the stage
sections) fails in ``load_params`` with one ParamsError naming the key, the value and what is
allowed, and a stage command line ends at argument parsing with that message (exit 2, no
traceback). Variants are data (params key -> value), applied by ``--variant NAME``.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import TEST_ENVIRONMENT

from pipeline import params as pipeline_params
from pipeline.params import Overlay, ParamsError, Variant, load_params
from pipeline.stage_cli import stage_argument_parser
from stable_sam import build, config
from stable_sam.config import (
    ConfigError,
    OcclusionConfig,
    PluginConfig,
    PromptMixConfig,
    TuningConfig,
    check_config,
    is_eval_prompt_kind,
)
from stable_sam.data import DatasetError, SegmentationFolder, prepare_eval_image
from stable_sam.modeling import StableSam, deformable_sampling, dynamic_routing, plugged_attention
from stable_sam.prompts import coarse_mask, sample_prompt

REPO = Path(__file__).resolve().parent.parent
PARAMS = REPO / "params.yaml"
CLUSTER = REPO / "configs" / "vit_l_hqseg44k.yaml"

# --set override -> the whole message the user sees.
BAD_OVERRIDES = {
    "train.lr=-0.001": "train.lr = -0.001: must be a number > 0",
    "plugin.variant=dspp": "plugin.variant = 'dspp': must be one of 'dsp', 'spatial_attention', 'none'",
    "plugin.placements=[block3]": (
        "plugin.placements = ['block3']: must be a list of distinct values, each one of "
        "'block1', 'block2', 'final'"
    ),
    "plugin.placements=[block2,block2]": (
        "plugin.placements = ['block2', 'block2']: must be a list of distinct values, each one of "
        "'block1', 'block2', 'final'"
    ),
    "plugin.placements=[]": (
        "plugin.variant = 'dsp', plugin.placements = []: need at least one placement (e.g. [block2]) "
        "unless variant is 'none'"
    ),
    "plugin.fixed_alpha1=2.0": "plugin.fixed_alpha1 = 2.0: must be a number in [0, 1]",
    "plugin.routing=learned": "plugin.routing = 'learned': must be one of 'drp', 'fixed'",
    "plugin.routing_norm=tanh": "plugin.routing_norm = 'tanh': must be one of 'softmax', 'sigmoid'",
    "plugin.drp_token=cls": "plugin.drp_token = 'cls': must be one of 'mask0', 'iou', 'mean_output'",
    "plugin.drp_hidden=0": "plugin.drp_hidden = 0: must be an integer >= 1",
    "plugin.offset_bound=0.0": "plugin.offset_bound = 0.0: must be null or a number > 0",
    "plugin.offset_groups=0": "plugin.offset_groups = 0: must be an integer >= 1",
    "plugin.offset_kernel=4": "plugin.offset_kernel = 4: must be an odd integer >= 1",
    "plugin.amplitude=conv3x3": "plugin.amplitude = 'conv3x3': must be one of 'conv1x1', 'conv1x1_modulated'",
    "plugin.padding_mode=wrap": (
        "plugin.padding_mode = 'wrap': must be one of 'border', 'zeros', 'reflection'"
    ),
    "plugin.replace=values": "plugin.replace = 'values': must be one of 'keys_values', 'keys'",
    "plugin.init=zeros": "plugin.init = 'zeros': must be one of 'identity', 'default'",
    "tuning.decoder=head": "tuning.decoder = 'head': must be one of 'frozen', 'prediction_head', 'full'",
    "tuning.encoder=lorra": "tuning.encoder = 'lorra': must be one of 'frozen', 'lora', 'adapter'",
    "tuning.lora_rank=0": "tuning.lora_rank = 0: must be an integer >= 1",
    "sam.type=vit_x": "sam.type = 'vit_x': must be one of 'vit_b', 'vit_l', 'vit_h', 'tiny', 'small'",
    "sam.encoder_precision=fp8": "sam.encoder_precision = 'fp8': must be one of 'fp32', 'bf16', 'fp16', 'auto'",
    "fetch.source=remot": "fetch.source = 'remot': must be one of 'embedded', 'remote', 'local'",
    "fetch.validate=ful": "fetch.validate = 'ful': must be one of 'full', 'header'",
    "fetch.retries=-1": "fetch.retries = -1: must be an integer >= 0",
    "embedded.num_train=0": "embedded.num_train = 0: must be an integer >= 1",
    "embedded.min_objects=6": "embedded.min_objects = 6, embedded.max_objects = 5: need min_objects <= max_objects",
    "data.eval_resize=strech": (
        "data.eval_resize = 'strech': must be 'auto' (each set's protocol), 'stretch' or 'longest_side' "
        "(every set), or a non-empty mapping of set names to one of them (the others: auto)"
    ),
    "data.eval_resize.coco_val2017=squash": (
        "data.eval_resize = {coco_val2017: 'squash'}: must be 'auto' (each set's protocol), 'stretch' or "
        "'longest_side' (every set), or a non-empty mapping of set names to one of them (the others: auto)"
    ),
    "data.eval_resize.DIS_VD=stretch": (
        "data.eval_resize = {DIS_VD: 'stretch'}, data.val = ['embedded'], interactive.sets = ['embedded']: "
        "need data.eval_resize's set names among the registered datasets and the folder names of data.val "
        "and interactive.sets"
    ),
    "data.val=[]": "data.val = []: must be a non-empty list, each a non-empty string",
    "data.lsj_min_scale=2.0": "data.lsj_min_scale = 2.0, data.lsj_max_scale = 1.5: need lsj_min_scale <= lsj_max_scale",
    "data.hflip_probability=-0.1": "data.hflip_probability = -0.1: must be a number in [0, 1]",
    "occlusion.probability=1.5": "occlusion.probability = 1.5: must be a number in [0, 1]",
    "occlusion.copies=0": "occlusion.copies = 0: must be an integer >= 1",
    "occlusion.seed=-1": "occlusion.seed = -1: must be an integer >= 0",
    "synthesize.workers=-2": "synthesize.workers = -2: must be null or an integer >= 0",
    "base.steps=-5": "base.steps = -5: must be an integer >= 1",
    "base.steps=0": "base.steps = 0: must be an integer >= 1",
    "base.batch_size=0": "base.batch_size = 0: must be an integer >= 1",
    "base.box_probability=2.0": "base.box_probability = 2.0: must be a number in [0, 1]",
    "base.point_counts=[0]": "base.point_counts = [0]: must be a non-empty list, each an integer >= 1",
    "train.batch_size=0": "train.batch_size = 0: must be an integer >= 1",
    "train.steps=0": "train.steps = 0: must be null or an integer >= 1",
    "train.epochs=0": "train.epochs = 0: must be an integer >= 1",
    "train.checkpoint_every=0": "train.checkpoint_every = 0: must be an integer >= 1",
    "train.oversample_ratio=0.5": "train.oversample_ratio = 0.5: must be a number >= 1",
    "train.prompts.noisy_box=-1.0": "train.prompts.noisy_box = -1.0: must be a number >= 0",
    "train.prompts.coarse_mask_values=binary": (
        "train.prompts.coarse_mask_values = 'binary': must be one of 'hqsam', 'logits'"
    ),
    "train.prompts={gt_box: 0, noisy_box: 0, points: 0, coarse_mask: 0}": (
        "train.prompts.gt_box = 0.0, train.prompts.noisy_box = 0.0, train.prompts.points = 0.0, "
        "train.prompts.coarse_mask = 0.0: need at least one prompt weight > 0"
    ),
    "ray.num_workers=0": "ray.num_workers = 0: must be an integer >= 1",
    "ray.num_workers=3": (
        "train.batch_size = 32, ray.num_workers = 3: need train.batch_size divisible by ray.num_workers "
        "(the global batch is split over the workers)"
    ),
    "ray.cpus_per_worker=0": "ray.cpus_per_worker = 0.0: must be a number > 0",
    "eval.prompts=[gt_bx]": (
        "eval.prompts = ['gt_bx']: must be a list, each a prompt kind: 'gt_box', 'noisy_box', "
        "'coarse_mask', 'oracle_point' or 'point_K' with K >= 1"
    ),
    "eval.prompts=[point_0]": (
        "eval.prompts = ['point_0']: must be a list, each a prompt kind: 'gt_box', 'noisy_box', "
        "'coarse_mask', 'oracle_point' or 'point_K' with K >= 1"
    ),
    "eval.draws=0": "eval.draws = 0: must be an integer >= 1",
    "eval.threads=0": "eval.threads = 0: must be null or an integer >= 1",
    "eval.coco_min_box_iou=0.7": (
        "eval.coco_min_box_iou = 0.7, eval.coco_max_box_iou = 0.6: need coco_min_box_iou <= coco_max_box_iou"
    ),
    "ablate.alpha1_values=[0.0,1.5]": "ablate.alpha1_values = [0.0, 1.5]: must be a non-empty list, each a number in [0, 1]",
    "ablate.alpha1_prompts=[point_1,gt_bx]": (
        "ablate.alpha1_prompts = ['point_1', 'gt_bx']: must be a non-empty list of distinct values, each a "
        "prompt kind: 'gt_box', 'noisy_box', 'coarse_mask', 'oracle_point' or 'point_K' with K >= 1"
    ),
    "ablate.alpha1_prompts=[]": (
        "ablate.alpha1_prompts = []: must be a non-empty list of distinct values, each a prompt kind: "
        "'gt_box', 'noisy_box', 'coarse_mask', 'oracle_point' or 'point_K' with K >= 1"
    ),
    "ablate.seeds=[0,0]": "ablate.seeds = [0, 0]: must be a non-empty list of distinct values, each an integer >= 0",
    "tracking.experiment=''": "tracking.experiment = '': must be a non-empty string",
}


@pytest.mark.parametrize("override", sorted(BAD_OVERRIDES))
def test_a_bad_value_fails_at_load_naming_key_value_and_what_is_allowed(override):
    with pytest.raises(ParamsError) as caught:
        load_params(PARAMS, [override])
    assert str(caught.value) == f"--set {override}: {BAD_OVERRIDES[override]}"
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_a_bad_value_in_the_file_names_the_file(tmp_path):
    params = yaml.safe_load(PARAMS.read_text())
    params["train"]["lr"] = -0.001
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(ParamsError, match=re.escape(f"{path}: train.lr = -0.001: must be a number > 0")):
        load_params(path)
    # ... and an override that repairs it is enough.
    assert load_params(path, ["train.lr=0.001"]).train.lr == 0.001


@pytest.mark.parametrize(
    "override",
    [
        "train.steps=null",
        "train.steps=1",
        "eval.prompts=[point_7,coarse_mask,oracle_point]",
        "eval.prompts=[]",
        "plugin.offset_bound=null",
        "plugin.variant=none",
        "ray.max_failures=-1",
        "eval.threads=null",
        "plugin.placements=[block1,block2,final]",
        "sam.encoder_precision=fp16",
        # the lora and adapter variants pin fp32: turning the fast path on keeps every variant valid
        "sam.encoder_precision=bf16",
        "sam.encoder_precision=auto",
    ],
)
def test_allowed_values_load(override):
    load_params(PARAMS, [override])


def test_the_encoder_fast_path_is_refused_with_a_tuned_encoder():
    with pytest.raises(ParamsError) as caught:
        load_params(PARAMS, ["sam.encoder_precision=bf16", "tuning.encoder=lora"])
    assert str(caught.value) == (
        "--set tuning.encoder=lora: sam.encoder_precision = 'bf16', tuning.encoder = 'lora': need "
        "sam.encoder_precision fp32 (or auto, which gives fp32 here) when tuning.encoder is not frozen "
        "(the fast path is for a frozen encoder; LoRA/adapters train through it)"
    )


def test_params_yaml_every_overlay_and_the_core_defaults_are_valid():
    check_config(load_params(PARAMS))
    overlays = sorted((REPO / "configs").glob("*.yaml"))
    assert CLUSTER in overlays
    for overlay in overlays:
        check_config(load_params(PARAMS, [Overlay(str(overlay))]))
    for cls in (PluginConfig, TuningConfig, OcclusionConfig, PromptMixConfig):
        check_config(cls())


def test_the_core_rejects_bad_values_for_library_users():
    with pytest.raises(ConfigError, match=r"^plugin\.variant = 'dspp': must be one of"):
        check_config(PluginConfig(variant="dspp"), "plugin")
    with pytest.raises(ValueError, match=r"plugin\.fixed_alpha1 = 2\.0"):
        build.build_stable_sam(sam_type="tiny", plugin_config=PluginConfig(fixed_alpha1=2.0))


# ------------------------------------------------------------------------------------------------
# One declaration of each choice: the modules that consume a choice use it, and accept every value.

# Each choice tuple is declared in one module and imported, never restated, elsewhere.
CORE_CHOICES = (
    "PLUGIN_VARIANTS", "PLACEMENTS", "ROUTINGS", "ROUTING_NORMS", "DRP_TOKENS", "AMPLITUDES",
    "PADDING_MODES", "REPLACE_MODES", "INITS", "DECODER_TUNINGS", "ENCODER_TUNINGS",
    "COARSE_MASK_VALUES", "EVAL_RESIZE_MODES", "ENCODER_PRECISIONS",
)  # fmt: skip
PIPELINE_CHOICES = ("FETCH_SOURCES", "FETCH_VALIDATIONS")
DECLARED = {
    **dict.fromkeys(CORE_CHOICES, "stable_sam/config.py"),
    **dict.fromkeys(PIPELINE_CHOICES, "pipeline/params.py"),
    "EVAL_DEVICES": "pipeline/params_eval.py",  # (re-exported by pipeline/params.py)
}


def _choices(name: str) -> tuple[str, ...]:
    module = config if DECLARED[name].startswith("stable_sam") else pipeline_params
    return getattr(module, name)


@pytest.mark.parametrize("name", sorted(DECLARED))
def test_each_choice_tuple_is_written_down_once(name):
    """No module restates a choice tuple (a second copy drifts): it imports the declared one."""
    written = re.compile(r"\(\s*" + r"\s*,\s*".join(f"[\"']{re.escape(c)}[\"']" for c in _choices(name)))
    sources = [*(REPO / "stable_sam").rglob("*.py"), *(REPO / "pipeline").rglob("*.py")]
    found = [str(f.relative_to(REPO)) for f in sources if written.search(f.read_text())]
    assert found == [DECLARED[name]], found


def test_the_consumers_accept_every_declared_choice():
    for padding_mode in config.PADDING_MODES:
        for amplitude in config.AMPLITUDES:
            deformable_sampling.DeformableSamplingPlugin(
                embedding_dim=8, padding_mode=padding_mode, amplitude=amplitude
            )
    for init in config.INITS:
        deformable_sampling.DeformableSamplingPlugin(embedding_dim=8, init=init)
    for norm in config.ROUTING_NORMS:
        dynamic_routing.DynamicRoutingPlugin(embedding_dim=8, normalization=norm)
    sam, _ = build.build_sam("tiny")
    for token in config.DRP_TOKENS:
        plugged_attention.OutputTokenReader(sam.mask_decoder, token)
    for sam_type in ("small", "tiny"):  # sam.type takes build.SAM_TYPES itself
        assert sam_type in build.SAM_TYPES
    mask = np.zeros((32, 32), bool)
    mask[8:20, 8:24] = True
    image = np.zeros((32, 32, 3), np.uint8)
    for mode in config.EVAL_RESIZE_MODES:
        prepare_eval_image(image, mask, mode=mode, target_length=64)
    for values in config.COARSE_MASK_VALUES:
        coarse_mask(mask, generator=np.random.default_rng(0), size=(32, 32), values=values)
    for precision in config.ENCODER_PRECISIONS:
        StableSam(
            sam=sam, sam_type="tiny", plugin_config=PluginConfig(variant="none"), encoder_precision=precision
        )
    for validate in pipeline_params.FETCH_VALIDATIONS:  # accepted: it goes on to find no pairs
        with pytest.raises(DatasetError, match="no valid image/mask pair"):
            SegmentationFolder([], name="empty", validate=validate)


def test_placements_are_the_decoder_sites_of_every_small_sam():
    from stable_sam.modeling import plugin_sites

    for sam_type in build.SMALL_SAM_SPECS:
        sam, _ = build.build_sam(sam_type)
        assert sorted(plugin_sites(sam)) == sorted(config.PLACEMENTS), sam_type


@pytest.mark.parametrize(
    "kind",
    [
        "gt_box",
        "noisy_box",
        "coarse_mask",
        "oracle_point",
        "point_1",
        "point_10",
        "point_0",
        "points",
        "gt_bx",
    ],
)
def test_eval_prompt_kinds_are_exactly_what_the_evaluation_draws(kind):
    mask = np.zeros((64, 64), bool)
    mask[16:40, 20:44] = True
    rng = np.random.default_rng(0)
    if is_eval_prompt_kind(kind):
        assert sample_prompt(kind, mask, generator=rng, mask_input_size=(64, 64)).kind == kind
    else:
        with pytest.raises(ValueError, match="unknown prompt kind"):
            sample_prompt(kind, mask, generator=rng, mask_input_size=(64, 64))


# ------------------------------------------------------------------------------------------------
# Variants: data in params.yaml, applied by --variant NAME, checked at load like everything else


def _params_with_variants(tmp_path: Path, variants: dict) -> Path:
    params = yaml.safe_load(PARAMS.read_text())
    params["ablate"]["variants"] = variants
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_a_variant_applies_its_overrides_in_command_line_order(tmp_path):
    path = _params_with_variants(tmp_path, {"fixed": {"plugin.routing": "fixed", "plugin.fixed_alpha1": 0.3}})
    params = load_params(path, [Variant("fixed")])
    assert (params.plugin.routing, params.plugin.fixed_alpha1) == ("fixed", 0.3)
    assert load_params(path, [Variant("fixed"), "plugin.fixed_alpha1=0.7"]).plugin.fixed_alpha1 == 0.7
    assert load_params(path, ["plugin.fixed_alpha1=0.7", Variant("fixed")]).plugin.fixed_alpha1 == 0.3
    with pytest.raises(
        ParamsError, match=r"^--variant nope: .* has no ablate\.variants\.nope \(known: fixed\)$"
    ):
        load_params(path, [Variant("nope")])


@pytest.mark.parametrize(
    "variants, message",
    [
        (
            {"bad": {"plugin.variant": "dsp; touch x"}},
            "ablate.variants.bad: plugin.variant = 'dsp; touch x': must be one of",
        ),
        ({"bad": {"plugin.placements": ["block3"]}}, "ablate.variants.bad: plugin.placements = ['block3']"),
        ({"bad": {"plugin.foo": 1}}, "ablate.variants.bad: unknown key 'plugin.foo'"),
        ({"bad": {"train.lr": "fast"}}, "ablate.variants.bad: invalid value for 'train.lr'"),
        (
            {"a; touch x": {"train.lsj": False}},
            "ablate.variants = ['a; touch x']: must be a mapping of names matching [A-Za-z0-9_]+",
        ),
        ({"old": "--set plugin.routing=fixed"}, "invalid value for 'ablate.variants.old'"),
    ],
)
def test_every_variant_is_checked_at_load(tmp_path, variants, message):
    path = _params_with_variants(tmp_path, variants)
    with pytest.raises(ParamsError, match=re.escape(message)):
        load_params(path)  # whether or not the variant is the one run


def test_shell_syntax_in_a_variant_value_stays_a_literal_and_runs_nothing(tmp_path):
    path = _params_with_variants(tmp_path, {"odd": {"tracking.experiment": "x; touch pwned"}})
    assert load_params(path, [Variant("odd")]).tracking.experiment == "x; touch pwned"
    # Through a stage command line (--variant NAME), and with a name that is not one.
    code = (
        "import sys; from pipeline.stage_cli import stage_argument_parser; "
        "args = stage_argument_parser('t').parse_args(sys.argv[1:]); print(args.overrides)"
    )
    run = [sys.executable, "-c", code, "--params", str(path)]
    env = {**TEST_ENVIRONMENT, "PYTHONPATH": str(REPO)}
    ok = subprocess.run([*run, "--variant", "odd"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert ok.returncode == 0 and "Variant(name='odd')" in ok.stdout, ok.stderr
    bad = subprocess.run(
        [*run, "--variant", "odd; touch pwned"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert bad.returncode == 2
    assert "argument --variant: 'odd; touch pwned' is not a variant name ([A-Za-z0-9_]+)" in bad.stderr
    assert not (tmp_path / "pwned").exists()


def test_params_yaml_variant_names_are_identifiers():
    for path in (PARAMS, CLUSTER):
        names = yaml.safe_load(path.read_text())["ablate"]["variants"]
        assert names and all(pipeline_params.VARIANT_NAME.fullmatch(name) for name in names), path


def test_dvc_commands_interpolate_no_params_but_validated_names():
    """Only ``${key}`` of a foreach over ablate.variants (names checked at load), or ``${item}`` of a
    foreach over a literal list of identifiers written in dvc.yaml itself, may appear in a cmd."""
    for dvc_file in (REPO / "dvc.yaml", REPO / "base" / "dvc.yaml"):
        for name, stage in yaml.safe_load(dvc_file.read_text())["stages"].items():
            foreach = stage.get("foreach")
            body = stage.get("do", stage)
            used = set(re.findall(r"\$\{([^}]*)\}", str(body["cmd"])))
            if foreach is None:
                assert not used, (dvc_file, name, used)
            elif isinstance(foreach, str):
                assert foreach == "${ablate.variants}" and used <= {"key"}, (dvc_file, name, used)
            else:
                assert all(re.fullmatch(r"[A-Za-z0-9_]+", str(v)) for v in foreach), (dvc_file, name)
                assert used <= {"item"}, (dvc_file, name, used)


# ------------------------------------------------------------------------------------------------
# Stage command lines: the message, exit status 2, no traceback


def test_a_stage_command_line_with_a_bad_value_exits_2_with_the_message(capsys):
    parser = stage_argument_parser("test stage")
    parser.prog = "python -m pipeline.train"
    with pytest.raises(SystemExit) as caught:
        parser.parse_args(["--params", str(PARAMS), "--set", "train.lr=-0.001"])
    assert caught.value.code == 2
    assert capsys.readouterr().err == (
        "python -m pipeline.train: error: --set train.lr=-0.001: train.lr = -0.001: must be a number > 0\n"
    )


def test_train_base_stage_refuses_zero_steps_before_any_work(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.train_base",
            "--params",
            str(PARAMS),
            "--set",
            "base.steps=0",
            *("--data", "data", "--out", "out", "--metrics", "m.json", "--plot", "p.csv"),
        ],
        cwd=tmp_path,
        env={**TEST_ENVIRONMENT, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "python -m pipeline.train_base: error: --set base.steps=0: base.steps = 0: must be an integer >= 1"
    ]
    assert not any(tmp_path.iterdir())
