"""The encoder precision a device runs fast: "auto", and a warning for bf16/fp16 the device would emulate.

The CPU's features are faked through torch.cpu's probes, so every case runs on any machine.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from pipeline.params import ParamsError, load_params
from stable_sam import precision as precision_module
from stable_sam.build import build_stable_sam
from stable_sam.config import TuningConfig
from stable_sam.modeling.fast_attention import uses_fast_attention
from stable_sam.precision import native_dtype, resolve_encoder_precision, warn_if_emulated

PARAMS = Path(__file__).resolve().parent.parent / "params.yaml"
PROBES = (
    "_is_amx_tile_supported",
    "_is_avx512_bf16_supported",
    "_is_amx_fp16_supported",
    "_is_avx512_supported",
)


@pytest.fixture
def cpu(monkeypatch):
    """Fake the CPU: ``cpu(*features)`` makes exactly those torch.cpu probes answer True."""

    def fake(*features: str) -> None:
        for name in PROBES:
            monkeypatch.setattr(torch.cpu, name, lambda name=name: name in features, raising=False)

    return fake


@pytest.mark.parametrize(
    ("features", "bf16", "fp16"),
    [
        ((), False, False),  # AVX2 only: both emulated (measured 14.5x slower than fp32)
        (("_is_avx512_supported",), False, True),
        (("_is_avx512_supported", "_is_avx512_bf16_supported"), True, True),
        (("_is_amx_tile_supported",), True, False),
        (("_is_amx_tile_supported", "_is_amx_fp16_supported"), True, True),
    ],
)
def test_native_dtypes_on_a_cpu_follow_its_features(cpu, features, bf16, fp16):
    cpu(*features)
    assert native_dtype("fp32", "cpu")
    assert native_dtype("bf16", "cpu") is bf16
    assert native_dtype("fp16", "cpu") is fp16


def test_native_dtypes_on_a_gpu_follow_its_bf16_support(monkeypatch):
    answers = []
    for ampere in (True, False):

        def is_bf16_supported(including_emulation: bool = True, ampere=ampere) -> bool:
            answers.append(including_emulation)
            return ampere

        monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
        assert native_dtype("bf16", "cuda:1") is ampere
        assert native_dtype("fp16", "cuda") and native_dtype("fp32", "cuda")
    assert answers == [False, False]  # emulated bf16 does not count
    assert not native_dtype("bf16", "mps") and native_dtype("fp32", "mps")


def test_a_torch_without_a_probe_counts_as_not_native(monkeypatch):
    for name in PROBES:
        monkeypatch.delattr(torch.cpu, name, raising=False)
    assert not native_dtype("bf16", "cpu") and not native_dtype("fp16", "cpu")


def test_auto_is_bf16_only_where_native_and_the_encoder_is_frozen(cpu, caplog):
    caplog.set_level(logging.INFO, logger=precision_module.__name__)
    cpu()
    assert resolve_encoder_precision("auto", "cpu") == "fp32"
    assert "auto -> fp32 on cpu (no native bf16" in caplog.text
    cpu("_is_amx_tile_supported")
    assert resolve_encoder_precision("auto", "cpu") == "bf16"
    assert resolve_encoder_precision("auto", "cpu", encoder_frozen=False) == "fp32"
    for explicit in ("fp32", "bf16", "fp16"):  # an explicit choice is kept, wherever it runs
        cpu()
        assert resolve_encoder_precision(explicit, "cpu") == explicit
    with pytest.raises(ValueError, match=r"must be one of \['fp32', 'bf16', 'fp16', 'auto'\], got 'fp8'"):
        resolve_encoder_precision("fp8", "cpu")


def test_an_emulated_precision_is_said_not_refused(cpu, caplog):
    cpu()
    assert warn_if_emulated("bf16", "cpu")
    assert "encoder_precision='bf16' on cpu, which has no native bf16" in caplog.text
    assert "SLOWER than fp32" in caplog.text
    caplog.clear()
    cpu("_is_amx_tile_supported")
    assert not warn_if_emulated("bf16", "cpu") and not warn_if_emulated("fp32", "cpu")
    assert caplog.text == ""


def test_build_stable_sam_resolves_auto_for_the_device_and_warns_for_an_emulated_choice(cpu, caplog):
    cpu()
    model = build_stable_sam(sam_type="tiny", device="cpu", encoder_precision="auto")
    assert model.encoder_precision == "fp32" and not uses_fast_attention(model.sam.image_encoder)
    assert "WARNING" not in caplog.text
    model = build_stable_sam(sam_type="tiny", device="cpu", encoder_precision="bf16")
    assert model.encoder_precision == "bf16" and uses_fast_attention(model.sam.image_encoder)
    assert "no native bf16" in caplog.text  # it runs, as asked, and says what it costs
    cpu("_is_amx_tile_supported")
    caplog.clear()
    model = build_stable_sam(sam_type="tiny", device="cpu", encoder_precision="auto")
    assert model.encoder_precision == "bf16" and uses_fast_attention(model.sam.image_encoder)
    assert "WARNING" not in caplog.text
    # An encoder that trains gets fp32 from auto, and an explicit bf16 is still refused.
    lora = TuningConfig(encoder="lora")
    model = build_stable_sam(sam_type="tiny", tuning=lora, device="cpu", encoder_precision="auto")
    assert model.encoder_precision == "fp32"
    with pytest.raises(ValueError, match="fast path of a frozen encoder"):
        build_stable_sam(sam_type="tiny", tuning=lora, device="cpu", encoder_precision="bf16")


def test_params_take_auto_with_a_tuned_encoder_and_name_a_bad_value():
    load_params(PARAMS, ["sam.encoder_precision=auto", "tuning.encoder=lora"])
    with pytest.raises(ParamsError, match=r"sam\.encoder_precision = 'bfloat16': must be one of"):
        load_params(PARAMS, ["sam.encoder_precision=bfloat16"])
