"""place_store: record a store's wanted sets on text, order each layer, rewrite the store (the
package docstring says how), and return the record the manifest keeps under `placement`."""

from __future__ import annotations

import os
import time
from typing import Any

from .settings import CHUNK, DECAY, PARTNERS


def place_store(
    store_path: str | os.PathLike[str],
    ids: list[int],
    sparsity: str | None = None,
    hot: float = 0.0,
    partners: int | None = None,
    decay: float | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Reorder the store's neurons by co-activation on the token ids `ids` under the sparsity
    source `sparsity` (default: the calibrated predictors, else the oracle), the share `hot` of
    each layer pinned at one end (predictors only), and rewrite it in place (atomically). Returns
    the manifest's new `placement` record: the settings, the runs per token on `ids` before and
    after (coactivation.runs_per_token, mean over layers) and the seconds taken."""
    import torch

    from ..errors import InvalidArgumentError, check_int
    from ..sparsity import make_source
    from ..store import Store
    from ..strategies.dense import DenseFFN
    from . import order as O
    from .coactivation import record_wanted, runs_per_token
    from .rewrite import rewrite_store

    k = PARTNERS if partners is None else check_int("partners", partners, 1, 4096)
    d = DECAY if decay is None else decay
    if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 < d <= 1.0:
        raise InvalidArgumentError(f"decay must be a number in (0, 1], not {d!r}")
    if not ids:
        raise InvalidArgumentError("placement needs at least one token of text")
    t0 = time.perf_counter()
    store = Store(store_path)
    if store.config.n_experts:
        raise InvalidArgumentError(
            "a mixture-of-experts store is read whole expert by whole expert: no neuron order to place", store.path
        )
    spec = sparsity or ("predictor" if "predictors" in store.manifest else "oracle")
    source = make_source(spec, store, hot=hot)
    with torch.inference_mode():
        dense = DenseFFN(store, dequantize=True)
    wanted = record_wanted(store, dense, source, ids, CHUNK, progress)
    del dense
    hot_sets = getattr(source, "hot", None)
    orders, before, after = [], [], []
    from tqdm import tqdm

    for i in tqdm(range(len(wanted)), desc="place", unit="layer", disable=not progress):
        o = O.layer_order(wanted[i], None if hot_sets is None else hot_sets[i], k, d)
        L = store.layers[i]
        current = None if L.order is None else torch.tensor(L.order, dtype=torch.long)
        before.append(runs_per_token(wanted[i], current))
        after.append(runs_per_token(wanted[i], o))
        orders.append(o)
    t_order = time.perf_counter() - t0
    record = {
        "tokens": len(ids),
        "sparsity": spec,
        "hot": hot,
        "partners": k,
        "decay": d,
        "runs_per_token": {
            "before": round(sum(before) / len(before), 2),
            "after": round(sum(after) / len(after), 2),
        },
    }
    rewrite_store(store, orders, record, progress)
    return {**record, "seconds": {"order": round(t_order, 1), "total": round(time.perf_counter() - t0, 1)}}
