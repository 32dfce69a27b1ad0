"""StoreWriter: writes a store atomically (a temporary sibling folder, renamed when complete).

Converters hand it the canonical resident tensors and, layer by layer, the FFN matrices in
Hugging Face layout; it bundles neuron i's gate row, up row and down column into one contiguous
record (llmflash.store documents the format), pads each layer's region to 4 KiB and records a
CRC-32 per region. OPT's fc1 bias is not in the bundle: converters pass it with the resident
tensors (layers.{i}.ffn.up_bias, in source order, which is the order the bundles are written).
An interrupted conversion leaves only the temporary folder, which is removed on the way out
(if the process was killed, the next conversion to the destination or the next opening of the
store deletes it: llmflash.store.leftovers). A failed write (disk full, any OSError or
SafetensorError) is a ConvertError naming the file, the temporary folder removed. Non-finite
weights (NaN, or a value the store dtype cannot hold, which the cast turns into Inf) are refused,
naming the tensor. At the end it records each file's size and CRC-32 and the manifest's own
(store format version 4: llmflash.store.checksums).

The destination's checks and the swap that replaces an old store live in convert/destination.py.
"""

from __future__ import annotations

import os
import shutil
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from .. import store as S
from ..errors import ConvertError, StoreError
from ..models import quant
from ..models.config import ModelConfig
from ..models.quant import QTensor
from ..store.checksums import file_entry, is_finite, os_reason
from .destination import check_destination, clear_own_leftover, fsync_dir, swap_in


def check_quantizable(config: ModelConfig, dtype: str) -> None:
    """ConvertError naming the tensor unless `dim` and every resident matrix's input width are
    multiples of the 32-value block (a quantized store's requirement, store/layout.py)."""
    from ..models.quant import BLOCK

    if config.dim % BLOCK:
        raise ConvertError(
            f"--dtype {dtype}: the model width {config.dim} (the FFN bundles' rows) is not a multiple of {BLOCK}"
        )
    for name, (rows, cols) in S.quantized_names(config).items():
        if cols % BLOCK:
            raise ConvertError(f"--dtype {dtype}: tensor {name} has {cols} columns, not a multiple of {BLOCK}")


class StoreWriter:
    def __init__(
        self,
        dst: str | os.PathLike[str],
        config: ModelConfig,
        dtype: str = "float16",
        source: str = "",
        force: bool = False,
        src: str | os.PathLike[str] | None = None,
    ):
        """`source`: recorded in the manifest. `src`: the path converted from, if any; the
        destination must neither be it, nor lie inside it, nor contain it."""
        if dtype not in S.STORE_DTYPES:
            raise ConvertError(f"unsupported dtype {dtype!r}; choose one of {sorted(S.STORE_DTYPES)}")
        config.validate()
        self.quant = dtype if dtype in S.QUANT_DTYPES else None
        if self.quant:
            check_quantizable(config, dtype)
        self.dst = Path(dst)
        self.src = None if src is None else Path(src)
        self.force = force
        check_destination(self.dst, self.src, force)
        # quantized stores: the dtype of their float tensors (norms, biases) and of the values quantized
        self.config, self.dtype_name, self.dtype = config, dtype, S.DTYPES.get(dtype, torch.float32)
        self.source = source
        self.tmp = self.dst.parent / f".{self.dst.name}.tmp-{os.getpid()}"
        self.old = self.dst.parent / f".{self.dst.name}.old-{os.getpid()}"
        self.regions = S.plan_regions(config, dtype)
        self.layers: list[dict[str, Any] | None] = [None] * config.n_layers
        self.bundle_crcs: list[np.ndarray | None] = [None] * config.n_layers  # per layer, bundles.crc32
        self.extra: dict[str, Any] = {}
        self.kinds: dict[str, str] = {}  # quantized resident matrices whose blocks are not self.quant
        # quantized stores: resident.safetensors is written at the end, with each layer's down scales
        self._resident: dict[str, torch.Tensor] | None = None
        self._scales: dict[str, torch.Tensor] = {}
        self._ffn = None

    # -- context management: anything but a clean exit removes the temporary folder ---------------
    def __enter__(self) -> "StoreWriter":
        clear_own_leftover(self.tmp)  # an earlier run of this PID's, never a user's folder
        try:
            self.dst.parent.mkdir(parents=True, exist_ok=True)
            self.tmp.mkdir()
            self._ffn = open(self.tmp / S.FFN, "wb")
        except OSError as e:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise ConvertError(
                f"cannot create the temporary folder {self.tmp.name}: {os_reason(e)}", self.dst.parent
            ) from None
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if self._ffn is not None and not self._ffn.closed:
                with self._writing(S.FFN):
                    self._ffn.close()  # flushes: may meet a full disk
            if exc_type is None:
                self._finish()
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)

    @contextmanager
    def _writing(self, name: str) -> Iterator[None]:
        """Turn a failed write of store file `name` (disk full, I/O error, safetensors' own error)
        into a ConvertError naming the file at its destination."""
        from safetensors import SafetensorError

        try:
            yield
        except OSError as e:
            raise ConvertError(f"cannot write: {os_reason(e)}", self.dst / name) from None
        except SafetensorError as e:
            raise ConvertError(f"cannot write: {e}", self.dst / name) from None
        except StoreError as e:  # store.replace_file's own (the manifest): the same, renamed
            reason = str(e).removeprefix(f"{e.path}: " if e.path else "").removeprefix("cannot write the file: ")
            raise ConvertError(f"cannot write: {reason}", self.dst / name) from None

    def _finite(self, what: str, t: torch.Tensor) -> None:
        """ConvertError unless every value of `t` (already in the store dtype) is finite."""
        if not is_finite(t):
            raise ConvertError(
                f"{what} holds non-finite values (NaN, or Inf: values beyond {self.dtype_name}'s "
                "range); the source is corrupt or needs a wider --dtype"
            )

    # -- contents -------------------------------------------------------------------------------------
    def write_resident(self, tensors: dict[str, Any]) -> None:
        """The canonical resident tensors (float, or QTensor blocks of the store's own kind for a
        quantized store's matrices, kept as they are)."""
        from safetensors.torch import save_file

        want = S.expected_resident(self.config)
        missing, extra = sorted(set(want) - set(tensors)), sorted(set(tensors) - set(want))
        if missing or extra:
            raise ConvertError(f"resident tensors do not match the config: missing {missing[:5]}, extra {extra[:5]}")
        out = {}
        quantized = S.quantized_names(self.config) if self.quant else {}
        for name, shape in want.items():
            t = tensors[name]
            if tuple(t.shape) != shape:
                raise ConvertError(f"{name} has shape {tuple(t.shape)}, expected {shape}")
            if isinstance(t, QTensor):  # already in blocks (a GGUF source's own): kept as they are
                out[name] = self._blocks(name, t, any_kind=True)
                if t.kind != self.quant:
                    self.kinds[name] = t.kind
                continue
            out[name] = t.detach().to(self.dtype).contiguous()
            self._finite(name, out[name])
            if name in quantized:
                out[name] = self._quantize(out[name], f"resident tensor {name}")
        if self.quant:  # written by _finish, with the layers' down scales
            self._resident = out
            return
        with self._writing(S.RESIDENT):
            save_file(out, str(self.tmp / S.RESIDENT), metadata={"format": S.FORMAT})

    def write_layer(self, i: int, up: Any, down: Any, gate: Any = None) -> None:
        """Layer i's FFN in HF layout: gate/up (n, dim), down (dim, n). In order. (An fc1 bias
        goes to write_resident as layers.{i}.ffn.up_bias.) A quantized store takes them as
        QTensors of its own kind too (kept as they are: no second rounding)."""
        if i != sum(x is not None for x in self.layers):
            raise ConvertError(f"layers must be written in order (got {i})")
        c, n = self.config, self.config.ffn_dims[i]
        if self.quant:
            payload = self._q_layer(i, n, gate, up, down)
        else:
            parts = {"gate": gate, "up": up, "down": None if down is None else down.t()}
            cols = []
            for name, k in c.bundle_fields:
                t = self._ffn_part(i, name, parts[name], (n, k))
                cols.append(t)
            payload = torch.cat(cols, dim=1).contiguous().view(torch.uint8).numpy().tobytes()  # (n, bundle_values)
        offset, bb, region = self.regions[i]
        assert len(payload) == n * bb and self._ffn is not None
        if self._ffn.tell() != offset:
            raise ConvertError(f"layer {i}: internal offset mismatch {self._ffn.tell()} != {offset}")
        with self._writing(S.FFN):
            self._ffn.write(payload)
            self._ffn.write(b"\0" * (region - len(payload)))
        self.record_layer(i, payload)

    def _ffn_part(self, i: int, name: str, t: Any, shape: tuple[int, int]) -> torch.Tensor:
        """FFN matrix `name` of layer i, checked against `shape`, in the store dtype."""
        if t is None:
            raise ConvertError(f"layer {i}: missing FFN tensor {name!r}")
        if isinstance(t, QTensor):
            raise ConvertError(f"layer {i}'s FFN {name}: {t.kind} blocks in a {self.dtype_name} store")
        t = t.detach()
        if tuple(t.shape) != shape:
            raise ConvertError(f"layer {i}: FFN {name} has shape {tuple(t.shape)}, expected {shape}")
        t = t.to(self.dtype)
        self._finite(f"layer {i}'s FFN", t)
        return t

    def _q_layer(self, i: int, n: int, gate: Any, up: Any, down: Any) -> bytes:
        """A quantized store's layer: the bundles' bytes (store/layout.py), its down scales kept
        for resident.safetensors. gate/up rows and down_proj's rows (along the neurons, in
        blocks of 32: the last block padded with zero neurons) are quantized once, or kept as
        given when they are QTensors of the store's kind."""
        D = self.config.dim
        rows = []
        for name, t in (("gate", gate), ("up", up)) if self.config.gated else (("up", up),):
            if isinstance(t, QTensor):  # gate/up rows already in the store's blocks (a GGUF's own)
                if t.shape != (n, D):
                    raise ConvertError(f"layer {i}: FFN {name} has shape {t.shape}, expected {(n, D)}")
                rows.append(self._blocks(f"layer {i}'s FFN {name}", t))
            else:
                part = self._ffn_part(i, name, t, (n, D))
                rows.append(self._quantize(part.contiguous(), f"layer {i}'s FFN {name}"))
        g = quant.groups(n)
        if isinstance(down, QTensor):
            if down.shape != (D, n) or n % quant.BLOCK:
                raise ConvertError(f"layer {i}: FFN down has shape {down.shape}, expected {(D, n)}")
            blocks = self._blocks(f"layer {i}'s FFN down", down)
        else:
            part = self._ffn_part(i, "down", down, (D, n)).float()
            padded = torch.zeros(D, g * quant.BLOCK)
            padded[:, :n] = part
            blocks = self._quantize(padded, f"layer {i}'s FFN down")
        ints, d, m = quant.split_down(str(self.quant), blocks.numpy(), D, g)
        self._scales[f"layers.{i}.ffn.down_scale"] = torch.from_numpy(d)
        if m is not None:
            self._scales[f"layers.{i}.ffn.down_min"] = torch.from_numpy(m)
        group = (np.arange(n, dtype="<u4") // quant.BLOCK).view(np.uint8).reshape(n, 4)
        parts = [r.numpy() for r in rows] + [ints[:n], group]
        return np.concatenate(parts, axis=1).tobytes()

    def _quantize(self, t: torch.Tensor, what: str) -> torch.Tensor:
        """(rows, cols) float32 -> (rows, cols/32 * block_bytes) uint8 in the store's block format
        (gguf.quants: the same rounding as llama.cpp's converter). Finite values can still give a
        block a non-finite float16 scale or minimum (|w| beyond float16's range in q4_1, or about
        8e6 in q8_0): a ConvertError naming `what`, never a store that computes NaN."""
        from gguf import GGMLQuantizationType, quants

        kind = getattr(GGMLQuantizationType, str(self.quant).upper())
        with np.errstate(over="ignore"):  # an overflowing scale is checked just below, by name
            q = quants.quantize(np.ascontiguousarray(t.float().numpy()), kind)
        data = torch.from_numpy(np.ascontiguousarray(q, dtype=np.uint8))
        if not is_finite(QTensor(str(self.quant), (t.shape[0], t.shape[1]), data).scales()):
            raise ConvertError(f"{what}: its {self.quant} block scales overflow float16 (values too large)")
        return data

    def _blocks(self, what: str, t: QTensor, any_kind: bool = False) -> torch.Tensor:
        """A QTensor's blocks as they will be stored: its kind must be the store's (a resident
        matrix, `any_kind`: any block format, recorded in the manifest), its scales finite."""
        if self.quant is None or (t.kind != self.quant and not any_kind):
            raise ConvertError(f"{what}: {t.kind} blocks in a {self.dtype_name} store")
        if not is_finite(t.scales()):
            raise ConvertError(f"{what} holds non-finite block scales (NaN or Inf): the source is corrupt")
        return t.data.contiguous()

    def record_layer(self, i: int, payload: Any) -> None:
        """Layer i's manifest entry and per-bundle CRC-32s, from its payload as written to ffn.bin
        (any bytes-like object of n_neurons * bundle_bytes bytes)."""
        offset, bb, region = self.regions[i]
        n = self.config.ffn_dims[i]
        mv = memoryview(payload).cast("B")
        if len(mv) != n * bb:
            raise ConvertError(f"layer {i}: payload is {len(mv)} bytes, expected {n * bb}")
        self.bundle_crcs[i] = S.crc32_per_bundle(mv, bb)
        self.layers[i] = S.LayerRegion(
            i, offset, n, bb, region, tuple(self.config.bundle_fields), zlib.crc32(mv), None
        ).to_dict()

    def write_tokenizer(self, tokenizer_json: str | bytes, chat_template: str | None = None) -> None:
        data = tokenizer_json.encode() if isinstance(tokenizer_json, str) else tokenizer_json
        with self._writing(S.TOKENIZER):
            (self.tmp / S.TOKENIZER).write_bytes(data)
        if chat_template:
            self.extra["chat_template"] = chat_template

    def _finish(self) -> None:
        """Write bundles.crc32 and the manifest (with every file's checksum and its own), make all
        durable and rename the folder into place. Any failure: __exit__ removes the folder."""
        missing = [i for i, L in enumerate(self.layers) if L is None]
        if missing:
            raise ConvertError(f"conversion incomplete: FFN layers {missing[:5]} not written")
        if self.quant and self._resident is not None:
            from safetensors.torch import save_file

            with self._writing(S.RESIDENT):
                save_file(self._resident | self._scales, str(self.tmp / S.RESIDENT), metadata={"format": S.FORMAT})
        if not (self.tmp / S.RESIDENT).exists():
            raise ConvertError("conversion incomplete: resident weights not written")
        with self._writing(S.BUNDLE_CRCS):
            (self.tmp / S.BUNDLE_CRCS).write_bytes(np.concatenate(self.bundle_crcs).astype("<u4").tobytes())
        files = {}
        for name in (S.RESIDENT, S.BUNDLE_CRCS, S.TOKENIZER):
            if (self.tmp / name).exists():
                with self._writing(name):
                    files[name] = file_entry(self.tmp / name)
        manifest = {
            "format": S.FORMAT,
            "version": S.VQ if self.quant else S.VERSION,
            "dtype": self.dtype_name,
            "source": self.source,
            "config": self.config.to_dict(),
            "ffn_bytes": (self.tmp / S.FFN).stat().st_size,
            "alignment": S.ALIGN,
            "layers": self.layers,
            "chat_template": self.extra.get("chat_template"),
            "files": files,
        }
        if self.quant:
            manifest["quantized"] = {
                k: [*v, self.kinds[k]] if k in self.kinds else list(v)
                for k, v in S.quantized_names(self.config).items()
            }
        with self._writing(S.MANIFEST):
            S.write_manifest(self.tmp, manifest)
        for name in os.listdir(self.tmp):  # durable before visible
            with self._writing(name), open(self.tmp / name, "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(self.tmp)
        kind = check_destination(self.dst, self.src, self.force)  # again: it may have changed
        if kind == "store":
            swap_in(self.tmp, self.dst, self.old)
        else:  # absent, or an empty folder: rename(2) replaces it
            os.replace(self.tmp, self.dst)
        fsync_dir(self.dst.parent)
