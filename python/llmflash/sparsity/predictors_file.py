"""The predictors file: writing it atomically, and reading it as hostile input.

File `predictors.safetensors` (treated as hostile: every shape is checked against the config,
every problem is a StoreError naming the file):
    layers.{i}.in.weight   (R_i, D)   float16 (or the store dtype)
    layers.{i}.in.bias     (R_i,)     float32
    layers.{i}.out.weight  (n_i, R_i) float16
    layers.{i}.out.bias    (n_i,)     float32
    thresholds             (L,)       float32: logit threshold per layer for the recorded recall
    label_thresholds       (L,)       float32: magnitude threshold of the labels (0 for ReLU)
    pos_quantiles          (L, Q)     float32: held-out logits of active pairs, quantile levels
    neg_quantiles          (L, Q)     float32: the same for inactive pairs    linspace(0, 1, Q)
    pos_rate               (L,)       float32: share of held-out pairs that are active
    layers.{i}.rate        (n_i,)     float32: share of calibration tokens on which neuron i is
                                      active (optional: files before hot pinning lack it)
    metadata: format, version, kind ("lowrank" | "shadow"; absent: lowrank), rank, keep, sparsity,
              recall, tokens, heldout_tokens, epochs, seed, label ("relu" | "magnitude")
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import StoreError
from ..models.config import ModelConfig
from ..store import PREDICTORS, Store, replace_file
from .lowrank import LayerPredictor, TrainResult
from .predictors import Predictors
from .quantiles import QUANTILES, threshold_for_recall
from .shadow import GROUP as SHADOW_GROUP
from .shadow import ShadowLayer

FORMAT = "llmflash-predictors"
VERSION = 1
MAX_PREDICTORS_BYTES = 1 << 34


def save_predictors(
    path: str | os.PathLike[str],
    results: list[TrainResult],
    recall: float,
    label_thresholds: list[float],
    meta: dict[str, Any],
) -> Path:
    """Write predictors.safetensors atomically (a hidden temporary sibling, then os.replace)."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors: dict[str, Tensor] = {}
    for i, r in enumerate(results):
        p = r.predictor
        if isinstance(p, ShadowLayer):
            tensors[f"layers.{i}.shadow.codes"] = p.codes.contiguous()
            tensors[f"layers.{i}.shadow.scales"] = p.scales.half().contiguous()
            if p.up_bias is not None:
                tensors[f"layers.{i}.shadow.bias"] = p.up_bias.float().contiguous()
            continue
        tensors[f"layers.{i}.in.weight"] = p.in_w.contiguous()
        tensors[f"layers.{i}.in.bias"] = p.in_b.float().contiguous()
        tensors[f"layers.{i}.out.weight"] = p.out_w.contiguous()
        tensors[f"layers.{i}.out.bias"] = p.out_b.float().contiguous()
    tensors["thresholds"] = torch.tensor([threshold_for_recall(r.pos_quantiles, recall) for r in results])
    tensors["label_thresholds"] = torch.tensor(label_thresholds, dtype=torch.float32)
    tensors["pos_quantiles"] = torch.stack([r.pos_quantiles for r in results]).float()
    tensors["neg_quantiles"] = torch.stack([r.neg_quantiles for r in results]).float()
    tensors["pos_rate"] = torch.tensor([r.pos_rate for r in results], dtype=torch.float32)
    for i, r in enumerate(results):
        if r.rate is not None:
            tensors[f"layers.{i}.rate"] = r.rate.float().contiguous()
    kind = "shadow" if results and isinstance(results[0].predictor, ShadowLayer) else "lowrank"
    md = {"format": FORMAT, "version": str(VERSION), "recall": repr(float(recall)), "kind": kind}
    md.update({k: str(v) for k, v in meta.items()})
    replace_file(path, lambda tmp: save_file(tensors, str(tmp), metadata=md))
    return path


KINDS = ("lowrank", "shadow")
META_INT = ("rank", "tokens", "heldout_tokens", "epochs", "seed")
META_FLOAT = ("keep", "sparsity", "recall")


def _parse_meta(md: dict[str, str] | None, path: Path) -> dict[str, Any]:
    md = md or {}
    if md.get("format") != FORMAT:
        raise StoreError(f"not a predictors file (metadata format {md.get('format')!r:.40}, expected {FORMAT!r})", path)
    if md.get("version") != str(VERSION):
        raise StoreError(
            f"unknown predictors version {md.get('version')!r:.20} (this llmflash reads {VERSION}): "
            "run `llmflash calibrate` again",
            path,
        )
    out: dict[str, Any] = {"label": md.get("label", ""), "kind": md.get("kind", "lowrank")}
    if out["kind"] not in KINDS:
        raise StoreError(f"metadata kind = {out['kind']!r:.40} (expected one of {', '.join(KINDS)})", path)
    for k in META_INT:
        if k in md:
            try:
                out[k] = int(md[k])
            except ValueError:
                raise StoreError(f"metadata {k} = {md[k]!r:.40} is not an integer", path) from None
    for k in META_FLOAT:
        try:
            out[k] = float(md[k])
        except (KeyError, ValueError):
            raise StoreError(f"metadata {k} = {md.get(k)!r:.40} is not a number", path) from None
    if not 0.0 < out["recall"] <= 1.0:
        raise StoreError(f"metadata recall = {out['recall']} is not in (0, 1]", path)
    if out["label"] not in ("relu", "magnitude"):
        raise StoreError(f"metadata label = {out['label']!r:.40} (expected 'relu' or 'magnitude')", path)
    return out


def read_predictors(
    path: str | os.PathLike[str], config: ModelConfig, dtype: torch.dtype | None = None, hot: float = 0.0
) -> Predictors:
    """Open and validate a predictors file against `config` (every name, shape and dtype; finite
    values; metadata). Any problem is a StoreError naming the file. `hot` (a share in [0, 1)):
    pin that share of each layer's neurons, the most often active by the file's per-neuron
    rates, and keep predictor rows for the others only (Predictors.hot / .cold). The thresholds
    still come from the held-out quantiles over all neurons: with pinning, a RECALL or STAY level
    picks the same logit threshold as without, not that recall over the cold neurons alone."""
    if not 0.0 <= hot < 1.0:
        raise ValueError(f"hot share must be in [0, 1), not {hot}")
    path = Path(path)
    if not path.is_file():
        raise StoreError("no predictors file: run `llmflash calibrate STORE` first", path)
    size = path.stat().st_size
    if size > MAX_PREDICTORS_BYTES:
        raise StoreError(f"predictors file is {size} bytes, over the {MAX_PREDICTORS_BYTES} cap", path)
    meta, tensors = _read_tensors(path, config)
    t = _Checked(tensors, path)
    L = config.n_layers
    rates = _rates(t, config)
    hot_ids = cold_ids = None
    if hot > 0:
        if rates is None:
            raise StoreError(
                "hot pinning needs per-neuron rates, which this predictors file (written "
                "before they were recorded) lacks: run `llmflash calibrate` again",
                path,
            )
        hot_ids, cold_ids = zip(*(hot_split(r, hot) for r in rates))
    layers = [_layer(t, config, meta["kind"], i, None if cold_ids is None else cold_ids[i], dtype) for i in range(L)]
    thresholds = t.check("thresholds", (L,)).float()
    label_thresholds = t.check("label_thresholds", (L,)).float()
    pos_q = t.check("pos_quantiles", (L, QUANTILES)).float()
    neg_q = t.check("neg_quantiles", (L, QUANTILES)).float()
    pos_rate = t.check("pos_rate", (L,)).float()
    if bool((pos_q.diff(dim=1) < 0).any()) or bool((neg_q.diff(dim=1) < 0).any()):
        raise StoreError("pos_quantiles / neg_quantiles are not increasing", path)
    if bool(((pos_rate < 0) | (pos_rate > 1)).any()):
        raise StoreError("pos_rate is outside [0, 1]", path)
    return Predictors(
        layers,
        thresholds.tolist(),
        pos_q,
        neg_q,
        pos_rate,
        label_thresholds,
        meta,
        path,
        rates=rates,
        hot=None if hot_ids is None else list(hot_ids),
        cold=None if cold_ids is None else list(cold_ids),
    )


def _read_tensors(path: Path, config: ModelConfig) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The file's metadata, and its tensors once their names are exactly the expected ones."""
    from safetensors import SafetensorError, safe_open

    L = config.n_layers
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = _parse_meta(f.metadata(), path)
            names = set(f.keys())
            want = {"thresholds", "label_thresholds", "pos_quantiles", "neg_quantiles", "pos_rate"}
            shadow_bias = not config.gated and config.ffn_bias
            for i in range(L):
                if meta["kind"] == "shadow":
                    want |= {f"layers.{i}.shadow.codes", f"layers.{i}.shadow.scales"}
                    want |= {f"layers.{i}.shadow.bias"} if shadow_bias else set()
                else:
                    want |= {f"layers.{i}.{a}.{b}" for a in ("in", "out") for b in ("weight", "bias")}
            want |= {f"layers.{i}.rate" for i in range(L)} & names  # optional
            missing, extra = sorted(want - names), sorted(names - want)
            if missing:
                raise StoreError(
                    f"missing tensors {missing[:4]}{' ...' if len(missing) > 4 else ''} "
                    f"(a predictors file for {L} layers)",
                    path,
                )
            if extra:
                raise StoreError(f"unexpected tensors {extra[:4]}", path)
            # copies, not views of the file's memory map: a small tensor kept (a rate, a quantile)
            # would keep the whole mapping resident beside the packed predictors
            return meta, {name: f.get_tensor(name).clone() for name in sorted(want)}
    except SafetensorError as e:
        raise StoreError(f"cannot read predictors: {e}", path) from None
    except (OSError, ValueError, RuntimeError) as e:
        raise StoreError(f"cannot read predictors: {e}", path) from None


class _Checked:
    """The file's tensors, each handed out once its shape and dtype are as expected."""

    def __init__(self, tensors: dict[str, Tensor], path: Path):
        self.t, self.path = tensors, path

    def check(self, name: str, shape: tuple[int, ...], dtypes: tuple[torch.dtype, ...] = ()) -> Tensor:
        """The tensor `name` with shape `shape` and a dtype in `dtypes` (default: a finite float)."""
        v = self.t[name]
        if tuple(v.shape) != shape:
            raise StoreError(f"{name} has shape {tuple(v.shape)}, expected {shape}", self.path)
        if dtypes:
            if v.dtype not in dtypes:
                raise StoreError(f"{name} has dtype {v.dtype}, expected {dtypes[0]}", self.path)
            return v
        if v.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise StoreError(f"{name} has dtype {v.dtype}, expected a float type", self.path)
        if not bool(torch.isfinite(v).all()):
            raise StoreError(f"{name} holds non-finite values", self.path)
        return v


def _rates(t: _Checked, config: ModelConfig) -> list[Tensor] | None:
    """The per-neuron rates of every layer, or None for a file without them."""
    L = config.n_layers
    have = [i for i in range(L) if f"layers.{i}.rate" in t.t]
    if not have:
        return None
    if len(have) != L:
        raise StoreError(f"per-neuron rates for {len(have)} of {L} layers", t.path)
    rates = [t.check(f"layers.{i}.rate", (config.ffn_dims[i],)).float() for i in range(L)]
    if any(bool(((r < 0) | (r > 1)).any()) for r in rates):
        raise StoreError("a layers.*.rate is outside [0, 1]", t.path)
    return rates


def _layer(
    t: _Checked, config: ModelConfig, kind: str, i: int, cold: Tensor | None, dtype: torch.dtype | None
) -> LayerPredictor | ShadowLayer:
    """Layer i's predictor; with `cold` (hot pinning), its rows for those neurons only."""
    D, n = config.dim, config.ffn_dims[i]
    if kind == "shadow":
        if D % SHADOW_GROUP:
            raise StoreError(f"shadow predictors need a width divisible by {SHADOW_GROUP}; the model's is {D}", t.path)
        rows = 2 * n if config.gated else n
        codes = t.check(f"layers.{i}.shadow.codes", (rows, D // 2), (torch.uint8,))
        scales = t.check(f"layers.{i}.shadow.scales", (rows, D // SHADOW_GROUP)).half()
        shadow_bias = not config.gated and config.ffn_bias
        bias = t.check(f"layers.{i}.shadow.bias", (n,)).float() if shadow_bias else None
        if cold is not None:  # only the cold neurons' rows, packed once
            sel = torch.cat([cold, cold + n]) if config.gated else cold
            codes, scales, bias = codes[sel], scales[sel], None if bias is None else bias[cold]
        return ShadowLayer(codes.contiguous(), scales.contiguous(), config.gated, bias).release_codes()
    w = t.t[f"layers.{i}.in.weight"]
    if w.dim() != 2 or not 1 <= w.shape[0] <= max(D, n):
        raise StoreError(
            f"layers.{i}.in.weight has shape {tuple(w.shape)}, expected (R, {D}) with 1 <= R <= {max(D, n)}", t.path
        )
    R = w.shape[0]
    in_w = t.check(f"layers.{i}.in.weight", (R, D))
    out_w, out_b = t.check(f"layers.{i}.out.weight", (n, R)), t.check(f"layers.{i}.out.bias", (n,))
    if cold is not None:  # only the cold neurons' output rows
        out_w, out_b = out_w[cold], out_b[cold]
    return LayerPredictor(
        in_w.to(dtype) if dtype is not None else in_w,
        t.check(f"layers.{i}.in.bias", (R,)).float(),
        out_w.to(dtype or in_w.dtype).contiguous(),
        out_b.float().contiguous(),
    )


def hot_split(rate: Tensor, share: float) -> tuple[Tensor, Tensor]:
    """(hot, cold) sorted neuron ids: about `share` of the neurons, the most often active by
    `rate` (ties: lower id first), and the rest. The cold count is a multiple of 16 (torch's
    CPU int4 kernel packs shadow rows 16 at a time) and at least 16 (or all, if fewer)."""
    n = rate.numel()
    order = torch.sort(-rate, stable=True).indices  # most often active first
    cold = min(n, max(16, -(-(n - int(round(share * n))) // 16) * 16))
    return torch.sort(order[: n - cold]).values, torch.sort(order[n - cold :]).values


def load_predictors(
    store: Store | str | os.PathLike[str], recall: float | None = None, stay: float | None = None, hot: float = 0.0
) -> Predictors:
    """The store's calibrated predictors as a wanted-set source; `recall` re-chooses every
    layer's threshold for that target recall (from the held-out quantiles in the file); `stay`
    (a higher recall) adds hysteresis for cached neurons (Predictors.select); `hot` pins the
    most often active share of each layer's neurons (read_predictors). In a version-4 store the
    file must match the size and CRC-32 the manifest records (calibrate records them after writing
    the file): a StoreError naming the file otherwise."""
    if not isinstance(store, Store):
        store = Store(store)
    if (store.path / PREDICTORS).is_file():  # (a missing file: read_predictors says so)
        store.check_file(PREDICTORS)  # version 4: size and CRC-32 as recorded
    p = read_predictors(store.path / PREDICTORS, store.config, dtype=store.dtype, hot=hot)
    entry = store.manifest.get("predictors")
    if entry is not None:
        size = (store.path / PREDICTORS).stat().st_size
        if not isinstance(entry, dict) or entry.get("bytes") != size:
            raise StoreError(
                f"the manifest's predictors entry does not match the file ({size} bytes): "
                "replaced or half-written; run `llmflash calibrate` again",
                store.path / PREDICTORS,
            )
    if recall is None and stay is None:
        return p
    return p.with_recall(p.recall if recall is None else recall, stay)
