"""Which encoder precision a device runs fast: the ``"auto"`` choice, and a warning for an emulated one.

The frozen encoder's fast path (``StableSam.set_encoder_precision``: SDPA + autocast to bf16 or fp16)
is only fast where the hardware computes in that dtype. Where it does not, PyTorch emulates it, and
the "fast" path is far slower than fp32. Measured on an AVX2-only AMD EPYC (no AVX-512, no AMX),
torch 2.14, 1 thread: a 4096x768 @ 768x3072 matmul 0.28 s in fp32, 20.8 s in bf16, 20.2 s in fp16;
a vit_b-shaped encoder at 1024 px 26.4 s per image in fp32, 384 s in bf16 (14.5x slower). On a Xeon
with AMX-BF16 the same encoder ran 2.92x faster in bf16 than in fp32 (README, "Encoder fast path").

:func:`resolve_encoder_precision` turns ``"auto"`` into ``"bf16"`` where the device has native bf16
(CPU: AMX tiles or AVX512-BF16; CUDA: ``torch.cuda.is_bf16_supported(including_emulation=False)``,
i.e. Ampere or newer) and into ``"fp32"`` everywhere else, and for an encoder that trains (LoRA,
adapters: the fast path is for a frozen encoder only). :func:`warn_if_emulated` logs a warning when
bf16 / fp16 is asked for explicitly on a device that would emulate it: it is the user's choice, so
it runs, but not silently at a fraction of the expected speed.
"""

from __future__ import annotations

import logging

import torch

from .config import ENCODER_PRECISIONS

__all__ = ["ENCODER_PRECISION_CHOICES", "native_dtype", "resolve_encoder_precision", "warn_if_emulated"]

logger = logging.getLogger(__name__)

# What ``sam.encoder_precision`` / ``--encoder-precision`` accept: a precision, or "auto".
ENCODER_PRECISION_CHOICES = (*ENCODER_PRECISIONS, "auto")


def _cpu_has(name: str) -> bool:
    # torch.cpu's feature probes (cpuinfo underneath) are private: a torch without one answers "no".
    probe = getattr(torch.cpu, name, None)
    return bool(probe()) if probe is not None else False


def native_dtype(precision: str, device: str | torch.device) -> bool:
    """Whether ``device`` computes ``precision`` ("fp32" / "bf16" / "fp16") natively (not emulated).

    CPU: bf16 with AMX tiles or AVX512-BF16; fp16 with AMX-FP16 or AVX-512 (where oneDNN converts at
    full vector width: 1.4x faster than fp32 on a Xeon). CUDA: bf16 on compute capability >= 8.0;
    fp16 on every CUDA GPU. Other devices (MPS, ...): only fp32 is known to be native.
    """
    device = torch.device(device)
    if precision == "fp32":
        return True
    if device.type == "cpu":
        if precision == "bf16":
            return _cpu_has("_is_amx_tile_supported") or _cpu_has("_is_avx512_bf16_supported")
        return _cpu_has("_is_amx_fp16_supported") or _cpu_has("_is_avx512_supported")
    if device.type == "cuda":
        return precision == "fp16" or torch.cuda.is_bf16_supported(including_emulation=False)
    return False


def resolve_encoder_precision(
    precision: str, device: str | torch.device, *, encoder_frozen: bool = True
) -> str:
    """``precision`` itself, or for ``"auto"``: "bf16" where ``device`` runs it natively and the encoder
    is frozen, else "fp32". Raises ``ValueError`` naming the value for anything else."""
    if precision not in ENCODER_PRECISION_CHOICES:
        raise ValueError(
            f"encoder_precision must be one of {list(ENCODER_PRECISION_CHOICES)}, got {precision!r}"
        )
    if precision != "auto":
        return precision
    chosen = "bf16" if encoder_frozen and native_dtype("bf16", device) else "fp32"
    logger.info(
        "encoder_precision auto -> %s on %s (%s)",
        chosen,
        torch.device(device),
        "native bf16"
        if chosen == "bf16"
        else (
            "the encoder trains"
            if not encoder_frozen
            else "no native bf16: emulated bf16 is slower than fp32"
        ),
    )
    return chosen


def warn_if_emulated(precision: str, device: str | torch.device) -> bool:
    """Log a warning (and return True) when ``precision`` would be emulated on ``device``."""
    if native_dtype(precision, device):
        return False
    logger.warning(
        "encoder_precision=%r on %s, which has no native %s: PyTorch emulates it, and the fast path is "
        "then much SLOWER than fp32 (an AVX2-only CPU: 14.5x slower on a vit_b encoder); use 'auto' or 'fp32'",
        precision,
        torch.device(device),
        precision,
    )
    return True
