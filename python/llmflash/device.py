"""Where a model's math runs: the CPU (the default) or a CUDA GPU.

`--device` / `device=` takes `cpu`, `cuda`, `cuda:N` or `auto` (cuda when torch sees one, else
cpu). On a GPU the resident weights, the KV cache and the FFN's matrices (dense), read buffer
(naive) or neuron caches (flash: strategies/flash/device_rows.py) live in GPU memory and torch
computes there; reading from flash stays on the host (the Rust reader), and what it reads goes
up to the GPU. The CPU-only kernels (llmflash._native: float16 matrix-vector products, the
quantized block kernels, the whole-token native decode) never see a GPU tensor: each caller asks
`on_cpu` first.

A GPU that torch cannot use is bad input, like a wrong path: InvalidArgumentError naming what was
asked and what torch sees (the command line exits with 2).
"""

from __future__ import annotations

import torch

from .errors import InvalidArgumentError

DEVICES = "cpu, cuda, cuda:N or auto"


def resolve_device(spec: str | torch.device | None) -> torch.device:
    """`spec` (None: cpu) as a torch.device this machine can run on; InvalidArgumentError for a
    malformed name, a device type other than cpu/cuda, or a GPU torch does not see."""
    if spec is None:
        return torch.device("cpu")
    if isinstance(spec, str) and spec.strip().lower() == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(spec.strip().lower() if isinstance(spec, str) else spec)
    except (RuntimeError, TypeError, ValueError):
        raise InvalidArgumentError(f"device {spec!r} is not a device name (choose {DEVICES})") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise InvalidArgumentError(f"device {str(dev)!r} is not supported (choose {DEVICES})")
    if not torch.cuda.is_available():
        raise InvalidArgumentError(
            f"device {str(dev)!r}: torch sees no CUDA GPU here (torch {torch.__version__}, "
            f"built for CUDA {torch.version.cuda or 'none'}); use --device cpu"
        )
    count = torch.cuda.device_count()
    index = 0 if dev.index is None else dev.index
    if index >= count:
        raise InvalidArgumentError(f"device {str(dev)!r}: torch sees {count} CUDA GPU(s), cuda:0..cuda:{count - 1}")
    return torch.device("cuda", index)


def on_cpu(t: torch.Tensor | torch.device) -> bool:
    """Whether a tensor (or device) is on the CPU: where the native kernels may take it."""
    return (t if isinstance(t, torch.device) else t.device).type == "cpu"


def device_stats(device: torch.device) -> dict[str, float]:
    """What a GPU holds for this process (bytes allocated by torch now and at most since the last
    reset), for stats(); nothing on the CPU."""
    if device.type != "cuda":
        return {}
    return {
        "device_allocated_bytes": float(torch.cuda.memory_allocated(device)),
        "device_peak_bytes": float(torch.cuda.max_memory_allocated(device)),
    }


def synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued work (a timing must not stop at the launch); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
