"""An opened store (class Store): validated at open, read on demand. store/layout.py describes
the format, store/manifest.py validates the manifest."""

from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import StoreError
from ..models.quant import QBundles, QTensor, row_bytes
from .checksums import check_finite, compare_file, os_reason
from .layout import (
    BUNDLE_CRCS,
    FFN,
    KNOWN_FILES,
    MANIFEST,
    PREDICTORS,
    RESIDENT,
    SAFETENSORS_DTYPES,
    TOKENIZER,
    crc32_per_bundle,
    down_scale_shapes,
    expected_resident,
)
from .leftovers import recover
from .manifest import check_manifest, read_manifest

_REDO = {PREDICTORS: ("run `llmflash calibrate` again", "calibration")}  # remedy and writer, if not convert


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


class Store:
    """An opened, validated store. Cheap to open: nothing large is read until asked for."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        recover(self.path)  # clean up after interrupted conversions
        if not self.path.exists():
            raise StoreError("no such store folder", self.path)
        if not self.path.is_dir():
            raise StoreError("a store is a folder (made by `llmflash convert`), this is a file", self.path)
        for name in (MANIFEST, RESIDENT, FFN):
            if not (self.path / name).is_file():
                raise StoreError(f"missing {name}: not a complete llmflash store", self.path / name)
        for name in sorted(os.listdir(self.path)):
            if name not in KNOWN_FILES and not name.startswith("."):
                raise StoreError(
                    f"unexpected file in the store (a store holds only {', '.join(sorted(KNOWN_FILES))})",
                    self.path / name,
                )
        self.manifest: dict[str, Any] = read_manifest(self.path / MANIFEST)
        self._checked: set[str] = set()  # files whose checksum matched (once per Store)
        v = check_manifest(self.manifest, self.path)
        self.dtype_name: str = v.dtype_name
        self.dtype: torch.dtype = v.dtype
        self.config = v.config
        self.layers = v.layers
        self.ffn_path = self.path / FFN
        self.has_bundle_crcs = v.has_bundle_crcs
        self.files: dict[str, dict[str, int]] | None = v.files
        self.quant: str | None = v.quant  # quantized stores: "q8_0" | "q4_0" | "q4_1" (dtype: float32)
        self.quantized: dict[str, tuple[int, int, str]] = v.quantized or {}  # name -> (rows, cols, kind)

    # -- checksums ---------------------------------------------------------------------------
    def check_file(self, name: str) -> bool:
        """Hash file `name` (one of CHECKSUMMED) and compare it with the manifest's record, once per
        Store: True when it matches (now or earlier), False when the store's version records no
        checksums (before version 4: nothing checked). StoreError naming the file when it cannot
        be read (with the system's reason: permission denied is not "no such file"), is not
        recorded, or does not match."""
        if self.files is None:
            return False
        if name in self._checked:
            return True
        path = self.path / name
        rec = self.files.get(name)
        hint, when = _REDO.get(name, ("convert the model again", "conversion"))
        if rec is None:
            raise StoreError(
                f"not recorded in the manifest's files: added after conversion or by an interrupted writer; {hint}",
                path,
            )
        compare_file(path, rec, when, hint)
        self._checked.add(name)
        return True

    # -- contents --------------------------------------------------------------------------
    @property
    def chat_template(self) -> str | None:
        t = self.manifest.get("chat_template")
        return t if isinstance(t, str) else None

    def resident(self) -> dict[str, Any]:
        """Load resident.safetensors, checking every canonical name and shape is there. A
        quantized store's matrices come back as models.quant.QTensor (their blocks, never
        dequantized whole), its 1-D tensors as float32."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        rpath = self._open_resident()
        try:
            tensors = load_file(str(rpath))
        except OSError as e:
            raise StoreError(f"cannot read resident weights: {os_reason(e)}", rpath) from None
        except (SafetensorError, ValueError) as e:
            raise StoreError(f"cannot read resident weights: {e}", rpath) from None
        want = expected_resident(self.config)
        scales = down_scale_shapes(self.config, self.quant) if self.quant else {}  # read by q_bundles
        missing = sorted((set(want) | set(scales)) - set(tensors))
        if missing:
            raise StoreError(f"missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}", rpath)
        extra = sorted(set(tensors) - set(want) - set(scales))
        if extra:
            raise StoreError(f"unexpected tensors {extra[:5]}", rpath)
        out: dict[str, Any] = {}
        for name, shape in want.items():
            if name in self.quantized:
                out[name] = self._qtensor(name, tensors[name], rpath)
                continue
            if tuple(tensors[name].shape) != shape:
                raise StoreError(f"{name} has shape {tuple(tensors[name].shape)}, expected {shape}", rpath)
            if tensors[name].dtype != self.dtype:  # the writer stores every tensor in the store dtype
                raise StoreError(
                    f"{name} is {_dtype_name(tensors[name].dtype)}, expected {self.dtype_name} (the manifest's dtype)",
                    rpath,
                )
            check_finite(name, tensors[name], rpath)
            out[name] = tensors[name]
        return out

    def _qtensor(self, name: str, t: torch.Tensor, rpath: Path) -> QTensor:
        """The quantized matrix `name` from its U8 tensor, checked against the manifest's shape."""
        rows, cols, kind = self.quantized[name]
        want = (rows, row_bytes(kind, cols))
        if t.dtype != torch.uint8:
            raise StoreError(f"{name} is {_dtype_name(t.dtype)}, expected uint8 blocks ({kind})", rpath)
        if tuple(t.shape) != want:
            raise StoreError(
                f"{name} has shape {tuple(t.shape)}, expected {want} ({rows} x {cols} values in {kind} blocks): "
                "truncated, or a wrong block count",
                rpath,
            )
        q = QTensor(kind, (rows, cols), t)
        check_finite(name, q.scales(), rpath)  # the only values that can be NaN or Inf
        return q

    def _open_resident(self) -> Path:
        """resident.safetensors' path, once it is known to be readable (opened here first, so a
        permission problem is reported as such: safetensors' own error would not say) and to
        match its recorded checksum (version 4, hashed once per Store)."""
        rpath = self.path / RESIDENT
        if not self.check_file(RESIDENT):
            try:
                with open(rpath, "rb"):
                    pass
            except OSError as e:
                raise StoreError(f"cannot read resident weights: {os_reason(e)}", rpath) from None
        return rpath

    def up_biases(self) -> list[torch.Tensor | None]:
        """Per layer, the fc1 bias (n_i,) float32 in store order (entry j is bundle j's neuron,
        order[j]); None per layer when the config has no FFN bias. Reads only these tensors of
        resident.safetensors (memory-mapped), so an FFN strategy can hold them beside the model."""
        if not self.config.ffn_bias:
            return [None] * self.config.n_layers
        return [t.float() for t in self._layer_tensors("ffn.up_bias", [(n,) for n in self.config.ffn_dims])]

    def routers(self) -> list[torch.Tensor]:
        """Per layer, a mixture of experts' router (E, D) in the store dtype (empty for a dense
        model): read alone, like up_biases, for the FFN strategies that route."""
        c = self.config
        return self._layer_tensors("ffn.router.weight", [(c.n_experts, c.dim)] * c.n_layers) if c.n_experts else []

    def _layer_tensors(self, suffix: str, shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
        """layers.{i}.{suffix} for every layer, checked for its shape, the store dtype and
        finiteness (StoreError naming resident.safetensors)."""
        from safetensors import SafetensorError, safe_open

        rpath = self._open_resident()
        out: list[torch.Tensor] = []
        try:
            with safe_open(str(rpath), framework="pt") as f:
                names = set(f.keys())
                for i, want in enumerate(shapes):
                    name = f"layers.{i}.{suffix}"
                    if name not in names:
                        raise StoreError(f"missing tensor {name}", rpath)
                    sl = f.get_slice(name)
                    shape, dt = tuple(sl.get_shape()), sl.get_dtype()
                    if shape != want:
                        raise StoreError(f"{name} has shape {shape}, expected {want}", rpath)
                    want_dt = SAFETENSORS_DTYPES.get(self.dtype_name, "F32")  # quantized: float32
                    if dt != want_dt:
                        raise StoreError(
                            f"{name} is {dt}, expected {want_dt} ({self.dtype_name}, the manifest's dtype)",
                            rpath,
                        )
                    out.append(f.get_tensor(name))
                    check_finite(name, out[-1], rpath)
        except OSError as e:
            raise StoreError(f"cannot read resident weights: {os_reason(e)}", rpath) from None
        except (SafetensorError, ValueError) as e:
            raise StoreError(f"cannot read resident weights: {e}", rpath) from None
        return out

    def q_bundles(self, i: int) -> QBundles | None:
        """Layer i's quantized bundle format (its kind and resident down scales, float16
        (groups, dim), checked for shape, dtype and finiteness); None for a float store. Reads
        only those tensors of resident.safetensors."""
        if not self.quant:
            return None
        from safetensors import SafetensorError, safe_open

        rpath = self._open_resident()
        shapes = down_scale_shapes(self.config, self.quant)
        names = [f"layers.{i}.ffn.down_scale"] + ([f"layers.{i}.ffn.down_min"] if self.quant == "q4_1" else [])
        got: list[torch.Tensor] = []
        try:
            with safe_open(str(rpath), framework="pt") as f:
                keys = set(f.keys())
                for name in names:
                    if name not in keys:
                        raise StoreError(f"missing tensor {name}", rpath)
                    sl = f.get_slice(name)
                    shape, dt = tuple(sl.get_shape()), sl.get_dtype()
                    if shape != shapes[name]:
                        raise StoreError(f"{name} has shape {shape}, expected {shapes[name]}", rpath)
                    if dt != "F16":
                        raise StoreError(f"{name} is {dt}, expected F16 (a quantized store's down scales)", rpath)
                    got.append(f.get_tensor(name))
                    check_finite(name, got[-1], rpath)
        except OSError as e:
            raise StoreError(f"cannot read resident weights: {os_reason(e)}", rpath) from None
        except (SafetensorError, ValueError) as e:
            raise StoreError(f"cannot read resident weights: {e}", rpath) from None
        return QBundles(self.quant, self.config.dim, bool(self.config.gated), got[0], got[1] if len(got) > 1 else None)

    def check_groups(self, i: int, rows: torch.Tensor) -> None:
        """StoreError naming ffn.bin unless every bundle of layer i (`rows`, its whole payload as
        read, (n, bundle_bytes) uint8) names the down group its neuron belongs to: the original
        id (LayerRegion.order) // 32. A bundle naming another group would be computed with another
        group's scales (in range) or refused by the kernel (out of range)."""
        L = self.layers[i]
        got = rows[:, -4:].contiguous().numpy().view("<u4")[:, 0]
        ids = np.arange(L.n_neurons) if L.order is None else np.asarray(L.order)
        bad = np.flatnonzero(got != ids // 32)
        if len(bad):
            j = int(bad[0])
            raise StoreError(
                f"layer {i}'s bundle {j} (neuron {int(ids[j])}) names down group {int(got[j])}, not "
                f"{int(ids[j]) // 32}: the bundle is corrupt",
                self.ffn_path,
            )

    def read_layer(self, i: int, verify: bool = True) -> torch.Tensor:
        """Layer i's bundles, (n_neurons, bundle_values) in the store dtype, read whole (buffered);
        a quantized store's (n_neurons, bundle_bytes) uint8."""
        L = self.layers[i]
        buf = np.empty(L.payload_bytes, dtype=np.uint8)
        with open(self.ffn_path, "rb") as f:
            f.seek(L.offset)
            got = f.readinto(memoryview(buf))
        if got != L.payload_bytes:
            raise StoreError(
                f"short read of layer {i} at offset {L.offset}: {got} of {L.payload_bytes} bytes", self.ffn_path
            )
        if verify:
            self.check_region(i, buf)
        if self.quant:
            return torch.from_numpy(buf).view(L.n_neurons, -1)
        t = torch.from_numpy(buf).view(self.dtype)
        return t.view(L.n_neurons, -1)

    def read_layer_float(self, i: int, verify: bool = True) -> torch.Tensor:
        """Layer i's bundles as float32 (n_neurons, bundle_values) whatever the store dtype (a
        quantized store's dequantized: a whole layer's float copy, for measurement aids such as
        the oracle)."""
        rows = self.read_layer(i, verify)
        q = self.q_bundles(i)
        if q is None:
            return rows.float()
        return q.dequantize(rows).view(rows.shape[0], self.config.bundle_values)

    def check_region(self, i: int, payload: Any) -> None:
        """StoreError unless `payload` (layer i's payload bytes, read whole) matches the region's CRC-32."""
        L = self.layers[i]
        if zlib.crc32(payload) != L.crc32:
            raise StoreError(
                f"checksum mismatch in layer {i}'s region at offset {L.offset}: the file is corrupt", self.ffn_path
            )

    def bundle_crcs(self, i: int) -> np.ndarray | None:
        """Layer i's per-bundle CRC-32s, (n_neurons,) uint32 in store order; None before
        version 3."""
        if not self.has_bundle_crcs:
            return None
        self.check_file(BUNDLE_CRCS)  # the whole table, on its first read (version 4)
        start = sum(L.n_neurons for L in self.layers[:i])
        n = self.layers[i].n_neurons
        return np.fromfile(self.path / BUNDLE_CRCS, dtype="<u4", count=n, offset=4 * start).astype(np.uint32)

    def read_bundles(self, i: int, positions: np.ndarray) -> torch.Tensor:
        """Layer i's bundles at the given store positions (ascending), (k, bundle_values) in the
        store dtype; each run of neighbouring positions is one read (buffered), each bundle
        checked against its CRC-32 (version 3)."""
        L = self.layers[i]
        pos = np.asarray(positions, dtype=np.int64)
        if len(pos) and (pos[0] < 0 or pos[-1] >= L.n_neurons or bool((np.diff(pos) <= 0).any())):
            raise ValueError(f"bundle positions must be ascending and in [0, {L.n_neurons})")
        bb = L.bundle_bytes
        out = np.empty(len(pos) * bb, dtype=np.uint8)
        starts = np.flatnonzero(np.diff(pos, prepend=-2) != 1)  # first index of each run
        ends = np.append(starts[1:], len(pos))
        fd = os.open(self.ffn_path, os.O_RDONLY)
        try:
            for a, b in zip(starts.tolist(), ends.tolist()):
                want = (b - a) * bb
                got = os.preadv(fd, [memoryview(out)[a * bb : b * bb]], L.offset + int(pos[a]) * bb)
                if got != want:
                    raise StoreError(
                        f"short read of layer {i}'s bundles {int(pos[a])}..{int(pos[b - 1])}: {got} of {want} bytes",
                        self.ffn_path,
                    )
        finally:
            os.close(fd)
        crcs = self.bundle_crcs(i)
        if crcs is not None:
            bad = np.flatnonzero(crc32_per_bundle(out, bb) != crcs[pos])
            if len(bad):
                j = int(pos[bad[0]])
                raise StoreError(
                    f"checksum mismatch in layer {i}'s bundle {j} at offset {L.offset + j * bb}: the file is corrupt",
                    self.ffn_path,
                )
        if self.quant:
            return torch.from_numpy(out).view(len(pos), -1)
        return torch.from_numpy(out).view(self.dtype).view(len(pos), -1)

    def tokenizer(self):
        """The store's `tokenizers.Tokenizer`, or None when the source shipped none."""
        tpath = self.path / TOKENIZER
        if not tpath.is_file():
            return None
        from tokenizers import Tokenizer

        self.check_file(TOKENIZER)
        try:
            return Tokenizer.from_file(str(tpath))
        except Exception as e:  # tokenizers raises a bare Exception subclass
            raise StoreError(f"cannot read tokenizer: {e}", tpath) from None
