"""Flash with its slot matrices on a GPU (FlashOptions.device other than the CPU).

Each layer's cache rows are a (capacity, bundle_values) tensor in GPU memory under the budget;
the Rust cache keeps only the index (NeuronCache(external_rows=True)). Per admission the host
learns what to do to those rows and does it on the device:
  - the eviction moves (Admission.moves: rows[dst] = rows[src], the paper's swap-delete), one
    batched gather-scatter on the GPU before any row is used;
  - the fill: its bundles land, read and CRC-checked, in a host buffer of their own (row k for
    filled_rows[k]); after the wait they go up and into their rows in one indexed copy;
  - the overflow: streamed through the host scratch area as on the CPU, each chunk sent up into
    a device scratch of the same rows before its FFN runs.
The predictors run on the host (a layer's FFN input comes down: D values), so their memory is
host memory, still counted in the budget. Quantized stores and lookahead run on the CPU only.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from ...errors import InvalidArgumentError
from ...io import Admission, AlignedBuf, NeuronCache


def check_device_options(store: Any, device: torch.device, lookahead: str | None) -> None:
    """What flash cannot do on a GPU yet: an InvalidArgumentError naming it."""
    if store.quant:
        raise InvalidArgumentError(
            f"flash on {device}: a quantized store runs on the CPU only so far: use --device cpu", store.path
        )
    if lookahead is not None:
        raise InvalidArgumentError(f"flash on {device}: lookahead runs on the CPU only so far (lookahead=False)")


def apply_moves(rows: Tensor, adm: Admission) -> int:
    """Apply the admission's eviction moves to the device rows; the number of rows moved. Moves
    of one admission never read a row an earlier one wrote (one batched copy); moves left by a
    failed admission come first and may, so then they go one by one, in order."""
    dst, src = adm.moves
    if not len(dst):
        return 0
    if np.intersect1d(dst, src).size:
        for d, s in zip(dst.tolist(), src.tolist()):
            rows[d] = rows[s]
    else:
        rows[torch.from_numpy(dst).to(rows.device)] = rows[torch.from_numpy(src).to(rows.device)]
    return len(dst)


def land(rows: Tensor, cache: NeuronCache, adm: Admission, view: Callable[[AlignedBuf, int], Tensor]) -> int:
    """After the wait: the fill's bundles into their device rows (`view`: a host buffer's first
    k bundles as a tensor); the bundles sent up."""
    buf = cache.take_landed()
    if buf is None:
        return 0
    k = adm.misses
    idx = torch.from_numpy(np.asarray(adm.filled_rows, dtype=np.int64)).to(rows.device)
    rows[idx] = view(buf, k).to(rows.device)
    return k
