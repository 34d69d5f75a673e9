"""The released base: its pretraining stage (SAM's recipe, resume), its release, and the base stage
of the default pipeline that verifies the pinned checkpoint. Tiny SAMs, tiny generated data."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from _tiny_project import random_tiny_sam_checkpoint

import pipeline.train_base as train_base
from pipeline.base import BaseCheckpointError, BasePaths, resolve_base
from pipeline.base import run as run_base
from pipeline.base_data import run as run_base_data
from pipeline.params import load_params
from pipeline.release_base import LINEAGE, Round, read_lineage, release, training_round, training_seconds
from pipeline.sam_source import read_sam_source
from pipeline.sources import CATEGORIES, target_families
from stable_sam.build import build_sam
from stable_sam.checkpoint import file_sha256
from stable_sam.config import PluginConfig
from stable_sam.modeling import StableSam
from stable_sam.training import (
    AugmentedPromptDataset,
    collate_training,
    precise_prompt_sampler,
    sam_training_step,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = [
    "sam.type=tiny",
    "embedded.image_size=64",
    "embedded.num_val=4",
    "embedded.max_objects=3",
    "base.num_images=8",
    "base.steps=4",
    "base.batch_size=2",
    "base.warmup_steps=1",
    "base.checkpoint_every=2",
    "base.log_every=2",
    "tighten.steps=3",
    "tighten.warmup_steps=1",
    "extend.steps=3",
    "extend.warmup_steps=1",
    "tracking.enabled=false",
]


@pytest.fixture(scope="module")
def base_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("base_data")
    summary = run_base_data(load_params(str(_params_file()), TINY), out)
    return out, summary


def test_pretraining_split_is_its_own_and_val_matches_the_embedded_one(base_data):
    out, summary = base_data
    assert summary["pretrain"]["num_images"] == 8 and summary["val"]["num_images"] == 4
    assert sorted(p.name for p in (out / "pretrain" / "im").iterdir())[0] == "pretrain_00000.jpg"
    families = target_families(out / "val")
    assert len(families) == 4 and set(families.values()) <= set(CATEGORIES)


def test_the_base_data_is_the_same_bytes_every_time(tmp_path):
    out = tmp_path / "base"
    params = load_params(str(_params_file()), TINY)
    run_base_data(params, out)
    first = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    shutil.rmtree(out)
    run_base_data(params, out)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == first  # no timings inside


def test_a_single_click_is_supervised_through_the_multimask_outputs(base_data):
    """One click: the best of SAM's 3 outputs takes the loss, so only those tokens get gradients."""
    out, _ = base_data
    torch.manual_seed(0)
    sam, _ = build_sam("tiny")
    model = StableSam(sam=sam, sam_type="tiny", plugin_config=PluginConfig(variant="none"))
    model.sam.requires_grad_(True)
    from stable_sam.data import open_dataset

    dataset = AugmentedPromptDataset(
        open_dataset(str(out / "pretrain"), split="train"),
        image_size=64,
        prompt_sampler=precise_prompt_sampler(point_counts=[1], box_probability=0.0),
        seed=0,
        targets="instances",
    )
    batch = collate_training([dataset[0], dataset[1]])
    terms = sam_training_step(model, batch, correction_clicks=0)
    terms["total"].backward()
    heads = model.sam.mask_decoder.output_hypernetworks_mlps
    grads = [float(sum(p.grad.abs().sum() for p in head.parameters())) for head in heads]
    assert grads[0] == 0.0, "mask token 0 learnt from an ambiguous single click"
    assert sum(g > 0 for g in grads[1:]) >= 1


def test_pretraining_resumes_to_the_same_weights(base_data, tmp_path, monkeypatch):
    out, _ = base_data
    monkeypatch.chdir(tmp_path)  # .stage_state lives under the working directory
    params = load_params(str(_params_file()), TINY)

    def paths(name):
        return train_base.TrainBasePaths(
            data=out / "pretrain",
            out=tmp_path / name,
            metrics=tmp_path / f"{name}.json",
            plot=tmp_path / f"{name}.csv",
        )

    uninterrupted = train_base.run(params, paths("a"))
    reference = torch.load(tmp_path / "a" / "sam_tiny.pth", weights_only=True)
    for state in (tmp_path / ".stage_state").rglob("state.pt"):
        state.unlink()

    calls = {"n": 0}
    original = train_base.sam_training_step

    def dies_at_step_3(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return original(*args, **kwargs)

    monkeypatch.setattr(train_base, "sam_training_step", dies_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train_base.run(params, paths("b"))
    monkeypatch.setattr(train_base, "sam_training_step", original)
    resumed = train_base.run(params, paths("b"))
    assert resumed["resumed_from_step"] == 2 and uninterrupted["resumed_from_step"] == 0
    weights = torch.load(tmp_path / "b" / "sam_tiny.pth", weights_only=True)
    assert all(torch.equal(weights[k], reference[k]) for k in reference)


def test_the_training_device_is_the_gpu_when_there_is_one_and_a_missing_one_is_named():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert train_base.training_device("auto").type == expected
    assert train_base.training_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="--device 'gpu0': not a torch device"):
        train_base.training_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device 'cuda:1': torch sees no CUDA device"):
            train_base.training_device("cuda:1")


def test_tighten_starts_from_the_pretrained_weights_with_its_own_keys(base_data, tmp_path, monkeypatch):
    """Stage tighten: the pretrained checkpoint is its step 0, and it trains with ``tighten``'s
    steps, rate and box jitter (every other choice the base's), in a resume state of its own."""
    out, _ = base_data
    monkeypatch.chdir(tmp_path)
    params = load_params(str(_params_file()), [*TINY, "tighten.box_jitter=0.0", "base.box_jitter=0.3"])
    cfg = train_base.phase_config(params, "tighten")
    assert (cfg.steps, cfg.lr, cfg.box_jitter, cfg.seed) == (3, params.tighten.lr, 0.0, params.tighten.seed)
    assert (cfg.batch_size, cfg.point_counts) == (params.base.batch_size, params.base.point_counts)
    assert train_base.phase_config(params, "pretrain") is params.base
    init = random_tiny_sam_checkpoint(tmp_path / "pretrained" / "sam_tiny.pth")
    start = torch.load(init, weights_only=True)

    seen = {}
    original = train_base.sam_training_step

    def records_the_first_step(model, batch, **kwargs):
        if not seen:
            seen["weights"] = {k: v.detach().clone() for k, v in model.sam.state_dict().items()}
        return original(model, batch, **kwargs)

    monkeypatch.setattr(train_base, "sam_training_step", records_the_first_step)
    sampler_kwargs = {}
    sampler = train_base.precise_prompt_sampler

    def records_its_kwargs(**kwargs):
        sampler_kwargs.update(kwargs)
        return sampler(**kwargs)

    monkeypatch.setattr(train_base, "precise_prompt_sampler", records_its_kwargs)
    paths = train_base.TrainBasePaths(
        data=out / "pretrain", out=tmp_path / "t", metrics=tmp_path / "t.json", plot=tmp_path / "t.csv",
        init=tmp_path / "pretrained", phase="tighten",
    )  # fmt: skip
    metrics = train_base.run(params, paths)
    assert all(torch.equal(seen["weights"][k], start[k]) for k in start)
    assert sampler_kwargs["box_jitter"] == 0.0  # tighten's, not the base's 0.3
    assert metrics["steps"] == 3 and metrics["init_sha256"] == file_sha256(init)
    tightened = torch.load(tmp_path / "t" / "sam_tiny.pth", weights_only=True)
    assert any(not torch.equal(tightened[k], start[k]) for k in start)
    assert (tmp_path / ".stage_state" / "tighten").is_dir()  # not the pretraining's resume state
    assert not (tmp_path / ".stage_state" / "train_base").exists()


def test_extend_starts_from_the_pinned_v1_with_its_own_keys(base_data, tmp_path, monkeypatch):
    """Stage extend: the committed v1 is its step 0 only if it is the file ``extend.init_sha256``
    pins; it trains with ``extend``'s keys in a resume state of its own."""
    out, _ = base_data
    monkeypatch.chdir(tmp_path)
    v1 = random_tiny_sam_checkpoint(tmp_path / "v1" / "sam_tiny.pth")
    pinned = [*TINY, f"extend.init_sha256={file_sha256(v1)}", "extend.lr=0.0003", "extend.seed=5"]
    params = load_params(str(_params_file()), pinned)
    cfg = train_base.phase_config(params, "extend")
    assert (cfg.steps, cfg.lr, cfg.seed, cfg.box_jitter) == (3, 0.0003, 5, params.extend.box_jitter)
    assert cfg.batch_size == params.base.batch_size

    def paths(name, **kwargs):
        return train_base.TrainBasePaths(
            data=out / "pretrain", out=tmp_path / name, metrics=tmp_path / f"{name}.json",
            plot=tmp_path / f"{name}.csv", **kwargs,
        )  # fmt: skip

    metrics = train_base.run(params, paths("e", init=tmp_path / "v1", phase="extend"))
    assert metrics["steps"] == 3 and metrics["init_sha256"] == file_sha256(v1)
    assert (tmp_path / ".stage_state" / "extend").is_dir()
    assert not (tmp_path / ".stage_state" / "tighten").exists()
    extended = torch.load(tmp_path / "e" / "sam_tiny.pth", weights_only=True)
    start = torch.load(v1, weights_only=True)
    assert any(not torch.equal(extended[k], start[k]) for k in start)

    other = load_params(str(_params_file()), [*TINY, f"extend.init_sha256={'f' * 64}"])
    with pytest.raises(
        ValueError, match=r"v1/sam_tiny.pth: sha256 [0-9a-f]{64} is not extend.init_sha256 f{64}"
    ):
        train_base.run(other, paths("x", init=tmp_path / "v1", phase="extend"))
    with pytest.raises(
        FileNotFoundError, match=r"nowhere/sam_tiny.pth: no checkpoint to start phase 'extend'"
    ):
        train_base.run(params, paths("x", init=tmp_path / "nowhere", phase="extend"))
    with pytest.raises(ValueError, match=r"phase 'extend' with init None"):
        train_base.run(params, paths("x", phase="extend"))
    with pytest.raises(ValueError, match=r"phase 'pretrain' with init .*v1"):
        train_base.run(params, paths("x", init=tmp_path / "v1"))
    assert not (tmp_path / "x").exists()  # refused before anything is written


def _params_file():
    from _tiny_project import PARAMS_FILE

    return PARAMS_FILE


@pytest.fixture
def released(tmp_path):
    checkpoint = random_tiny_sam_checkpoint(tmp_path / "release" / "sam_tiny.pth")
    return checkpoint, file_sha256(checkpoint)


def test_the_pinned_released_checkpoint_is_verified_and_named(released, tmp_path, monkeypatch):
    checkpoint, sha = released
    monkeypatch.chdir(tmp_path)
    params = load_params(
        str(_params_file()), ["sam.type=tiny", "sam.checkpoint=release/sam_tiny.pth", f"sam.sha256={sha}"]
    )
    source = run_base(params, BasePaths(raw=tmp_path / "raw", out=tmp_path / "models" / "base"))
    assert source.origin == "released" and source.sha256 == sha
    pointer = json.loads((tmp_path / "models" / "base" / "sam.json").read_text())
    assert pointer["checkpoint"] == "../../release/sam_tiny.pth"  # the same in every clone
    assert read_sam_source(tmp_path / "models" / "base").checkpoint == str(checkpoint.resolve())


def test_a_checkpoint_that_is_not_the_pinned_one_is_refused(released, tmp_path, monkeypatch):
    checkpoint, sha = released
    monkeypatch.chdir(tmp_path)
    params = load_params(
        str(_params_file()), ["sam.type=tiny", f"sam.checkpoint={checkpoint}", "sam.sha256=" + "f" * 64]
    )
    with pytest.raises(BaseCheckpointError, match=rf"has sha256 {sha}, but sam.sha256 pins f+"):
        resolve_base(params, tmp_path / "raw")


def test_a_small_sam_without_a_checkpoint_is_refused(tmp_path):
    params = load_params(str(_params_file()), ["sam.type=tiny", "sam.checkpoint=null"])
    with pytest.raises(BaseCheckpointError, match=r"needs sam\.checkpoint"):
        resolve_base(params, tmp_path / "raw")


def _round(phase: str, steps: int, seconds: float, release: str | None = None, init: str | None = None):
    return Round(
        phase=phase, steps=steps, lr=0.001, warmup_steps=1, box_jitter=0.0, seed=0, init_sha256=init,
        seconds=seconds, last_seconds=seconds, resumed_from_step=0, images_per_s=2.0, commit="c" * 40,
        release=release,
    )  # fmt: skip


def _write_lineage(release_dir, rounds) -> None:
    text = json.dumps([dataclasses.asdict(r) for r in rounds])
    (release_dir / LINEAGE).write_text(text)


def test_release_writes_an_fp16_checkpoint_the_strict_loader_takes_and_a_model_card(tmp_path):
    """A release is its previous release's lineage + the extend round that trained it: the card
    describes every round, ``lineage.json`` keeps them for the next release."""
    model = tmp_path / "extended"
    checkpoint = random_tiny_sam_checkpoint(model / "sam_tiny.pth")
    previous = tmp_path / "v1"
    v1 = random_tiny_sam_checkpoint(previous / "sam_tiny.pth")
    _write_lineage(previous, [_round("pretrain", 4, 20.0), _round("tighten", 2, 8.0, "v1", "ab" * 32)])
    params = tmp_path / "params.yaml"  # the committed one, for the tiny SAM
    params.write_text(_params_file().read_text().replace("  type: small ", "  type: tiny ", 1))
    loaded = load_params(str(params), ["extend.steps=3"])
    ran = {"parameters": 7, "images": 8, "steps": 3, "train_seconds": 6.0, "images_per_s": 4.0}
    ran |= {"resumed_from_step": 0, "init_sha256": file_sha256(v1)}
    (tmp_path / "extend.json").write_text(json.dumps(ran))
    # The history of a run resumed once: 2 steps at 4 img/s, 1 at 1 img/s: (2 + 1 x 4) x batch.
    plot = tmp_path / "extend.csv"
    plot.write_text("step,total,images_per_s\n1,1.0,4.0\n2,1.0,4.0\n3,1.0,1.0\n")
    batch = loaded.base.batch_size
    assert training_seconds(plot, batch_size=batch) == pytest.approx(batch * 1.5)
    extend = training_round("extend", tmp_path / "extend.json", plot, loaded, release="v2")
    assert (extend.steps, extend.seed, extend.lr) == (3, loaded.extend.seed, loaded.extend.lr)
    assert extend.seconds == pytest.approx(batch * 1.5, abs=0.1) and extend.init_sha256 == file_sha256(v1)
    evaluation = {"gt_box": {"miou": 81.0, "mbiou": 2.0}, "point_1": {"miou": 3.0, "mbiou": 2.5}}
    evaluation |= {"point_10": {"miou": 79.9, "mbiou": 1.0}, "noisy_box": {"miou": 66.0, "mbiou": 1.0}}
    evaluation["point_1_multimask"] = {"picked": 4.04, "oracle": 5.06}
    (tmp_path / "eval.json").write_text(json.dumps(evaluation))
    (tmp_path / "table.csv").write_text("family,images,gt_box\nall,4,1.0\nblob,4,1.0\ncurve,0,–\n")
    args = (tmp_path / "eval.json", tmp_path / "table.csv", tmp_path / "out", params)

    target, sha = release(model, previous, extend, *args, parameters=7)
    half = torch.load(target, weights_only=True)
    full = torch.load(checkpoint, weights_only=True)
    assert all(v.dtype == torch.float16 for v in half.values() if v.is_floating_point())
    assert target.stat().st_size < 0.6 * checkpoint.stat().st_size
    sam, loaded_sha = build_sam("tiny", target)
    assert loaded_sha == sha
    key = "mask_decoder.iou_token.weight"
    assert np.allclose(sam.state_dict()[key].numpy(), full[key].numpy(), atol=1e-3)
    assert [r.phase for r in read_lineage(tmp_path / "out")] == ["pretrain", "tighten", "extend"]
    assert read_lineage(tmp_path / "out")[-1] == extend
    card = (tmp_path / "out" / "MODEL_CARD.md").read_text()
    assert "`tiny` v2" in card and "kept in `v1/`" in card and "| parameters | 7 |" in card
    assert sha in card and "| blob | 4 | 1.0 |" in card and "| curve | 0 | – |" in card
    assert "mask token 0 (multimask off, above) 3.0" in card and "(highest predicted IoU) 4.0" in card
    assert "(an oracle) 5.1" in card
    assert "gt_box 81.0 (>= 80: yes); point_10 79.9 (>= 80: no); gt_box - noisy_box 15.0 (>= 15: yes)" in card
    assert "gt_box - point_1 78.0 (>= 20: yes)." in card
    assert f"9 x batch {batch} images" in card and "in 3 rounds" in card
    assert f"({20 + 8 + extend.seconds:.0f} s) in all" in card and "**tighten** 2 steps from those" in card
    assert f"extend (v2): 0.0 h ({extend.seconds:.0f} s) of training" in card
    assert f"**extend** 3 steps from v1 as committed (sha256 `{file_sha256(v1)[:12]}…`)" in card

    # Refused, naming what is wrong, with nothing written: a round that did not start from the
    # previous release, a name already taken, a lineage out of order, none at all.
    shutil.rmtree(tmp_path / "out")
    elsewhere = dataclasses.replace(extend, init_sha256="f" * 64)
    with pytest.raises(ValueError, match=r"v1/sam_tiny.pth: sha256 [0-9a-f]{64}, but the round .* f{64}"):
        release(model, previous, elsewhere, *args, parameters=7)
    with pytest.raises(ValueError, match=r"release name 'v1': must be new"):
        release(model, previous, dataclasses.replace(extend, release="v1"), *args, parameters=7)
    _write_lineage(previous, [_round("tighten", 2, 8.0, "v1", "ab" * 32)])
    with pytest.raises(ValueError, match=r"v1/lineage.json: rounds 'tighten': a base trains pretrain, tig"):
        release(model, previous, extend, *args, parameters=7)
    (previous / LINEAGE).unlink()
    with pytest.raises(FileNotFoundError, match=r"v1/lineage.json: no lineage"):
        release(model, previous, extend, *args, parameters=7)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match=r"extend.json: 3 steps, but extend.steps is 9 in the params"):
        training_round("extend", tmp_path / "extend.json", plot, load_params(str(params), ["extend.steps=9"]))


def test_the_committed_releases_keep_their_lineage():
    """Each committed release's lineage is in order, names it last, and starts from the one before."""
    root = _params_file().parent / "base" / "release"  # the current release (v2), v1 in v1/
    v1, v2 = read_lineage(root / "v1"), read_lineage(root)
    assert [r.release for r in v1] == [None, "v1"] and v2[:2] == v1 and v2[-1].release == "v2"
    assert v2[-1].init_sha256 == file_sha256(root / "v1" / "sam_small.pth")


def test_a_family_without_a_target_in_the_split_is_listed_with_zero_images(tmp_path):
    from pipeline.base_eval import _write_table

    row = {"miou": 71.04, "mbiou": 60.0, "n": 3}
    _write_table(tmp_path / "t.csv", {"all": {"gt_box": row}, "blob": {"gt_box": row}, "curve": {}})
    assert (tmp_path / "t.csv").read_text().splitlines() == [
        "family,images,gt_box",
        "all,3,71.0",
        "blob,3,71.0",
        "curve,0,–",
    ]


def test_one_click_with_multimask_is_answered_by_sams_pick_and_by_the_gt_oracle(base_data, tmp_path):
    """``picked`` equals the evaluation protocol's one-click mIoU with multimask on (an independent
    path: evaluate_prompts, which takes the highest-scored mask itself); the GT's pick of the three is at least SAM's;
    token 0 is the protocol's own ``point_1`` result, not measured again."""
    from pipeline.base_eval import evaluate_base

    out, _ = base_data
    params = load_params(str(_params_file()), [*TINY, "eval.prompts=[point_1, gt_box]", "eval.draws=3"])
    sam, _ = build_sam("tiny", random_tiny_sam_checkpoint(tmp_path / "sam_tiny.pth"))
    model = StableSam(sam=sam, sam_type="tiny", plugin_config=PluginConfig(variant="none")).eval()
    results, one_click = evaluate_base(model, out / "val", params)
    assert set(one_click) == {"picked", "oracle"} and "point_1" in results["all"]

    multimask = dataclasses.replace(params.eval, multimask_output=True)
    picked, _ = evaluate_base(model, out / "val", dataclasses.replace(params, eval=multimask))
    assert one_click["picked"] == pytest.approx(picked["all"]["point_1"]["miou"], abs=0.01)
    assert one_click["oracle"] >= one_click["picked"] and one_click["oracle"] > 0

    box_only = load_params(str(_params_file()), [*TINY, "eval.prompts=[gt_box]"])
    without, none = evaluate_base(model, out / "val", box_only)
    assert none == {} and "point_1" not in without["all"]
