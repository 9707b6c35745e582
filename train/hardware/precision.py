"""Which floating-point precision to compute in: one answer for the trainer, feature extraction and catdog-predict.

``auto`` means bf16 where the hardware computes it natively (a GPU that supports it; a CPU with AVX512-BF16 or AMX,
as torch's CPU backend reports), fp32 elsewhere: emulated bf16 is slower than fp32 (measured on CPUs without
AVX512-BF16), native bf16 about 2x faster.
"""

from __future__ import annotations

import torch


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), as torch's CPU backend sees it."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def cuda_has_bf16(device: torch.device | str | None = None) -> bool:
    """Whether a CUDA device (default: the current one) has bf16 tensor cores: compute capability 8.0+ (Ampere on),
    or ROCm. Not ``torch.cuda.is_bf16_supported()``: by default that also says yes on a V100/T4, where bf16 is
    emulated (slower than fp32), and it only ever looks at the current device."""
    if torch.version.hip:
        return True
    if not torch.cuda.is_available():
        return False
    index = torch.device(device).index if device is not None else None
    return torch.cuda.get_device_capability(index if index is not None else torch.cuda.current_device()) >= (8, 0)


def native_bf16(device: torch.device | str) -> bool:
    """Whether bf16 matmuls/convolutions run natively on ``device`` (CUDA with bf16, or a bf16-capable CPU)."""
    if torch.device(device).type == "cuda":
        return cuda_has_bf16(device)
    return cpu_has_bf16()


def auto_reason(precision: str, device: str) -> str:
    """Why ``auto`` came out as ``precision`` (Accelerate's ``no``/``bf16``) on a ``device`` type, for the log."""
    if device == "cuda":
        return "the GPU supports bf16" if precision == "bf16" else "the GPU has no native bf16 (pre-Ampere)"
    if precision == "bf16":
        return "the CPU has AVX512-BF16 or AMX"
    return "the CPU has neither AVX512-BF16 nor AMX: bf16 would be emulated, slower than fp32"


def choose_precision(requested: str, device: str, *, cpu_bf16=cpu_has_bf16, cuda_bf16=None) -> tuple[str, str]:
    """(precision in Accelerate's words: ``no``/``bf16``/``fp16``, why) for ``requested`` (train.mixed_precision:
    auto, fp32 or its alias no, bf16, fp16) on a ``device`` type."""
    if requested != "auto":
        return ("no" if requested == "fp32" else requested), "as configured"
    if device == "cuda":
        ok = cuda_has_bf16() if cuda_bf16 is None else cuda_bf16()
    else:
        ok = cpu_bf16()
    precision = "bf16" if ok else "no"
    return precision, auto_reason(precision, device)
