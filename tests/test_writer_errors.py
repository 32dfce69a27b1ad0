"""A write that fails while a store is written (disk full, an I/O error, safetensors' own error)
is a ConvertError naming the store file, one line and exit 2 from `llmflash convert`, with no
temporary folder left behind; weights the store dtype cannot hold (NaN, or beyond float16's
range) are refused at conversion, naming the tensor."""

from __future__ import annotations

import errno
import pathlib
import warnings
from pathlib import Path

import pytest
import torch
from store_builders import tiny_config, write_store

from llmflash.cli import main
from llmflash.convert import writer as W
from llmflash.errors import ConvertError
from llmflash.store import expected_resident

FULL = OSError(errno.ENOSPC, "No space left on device")


class _FullFile:
    """Stands in for ffn.bin opened for writing: every write meets a full disk."""

    closed = False

    def __init__(self, f):
        self.f = f

    def write(self, data):
        raise FULL

    def tell(self):
        return self.f.tell()

    def close(self):
        self.closed = True
        self.f.close()


def _fail(monkeypatch, name: str, exc: BaseException) -> None:
    """Make the writer's write of store file `name` raise `exc`."""
    if name == "resident.safetensors":
        import safetensors.torch

        def save_file(*a, **k):
            raise exc

        monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    elif name == "ffn.bin":
        real = open
        monkeypatch.setattr(
            W,
            "open",
            lambda p, mode="r", *a, **k: _FullFile(real(p, mode, *a, **k)) if mode == "wb" else real(p, mode, *a, **k),
            raising=False,
        )
    else:  # tokenizer.json, bundles.crc32 (write_bytes), manifest (write_text)
        for method in ("write_bytes", "write_text"):
            real_method = getattr(pathlib.Path, method)

            def fake(self, *a, _real=real_method, **k):
                if self.name == name or self.name.startswith(f".{name}.tmp-"):
                    raise exc
                return _real(self, *a, **k)

            monkeypatch.setattr(pathlib.Path, method, fake)


def _convert(src: Path, dst: Path, capsys) -> tuple[int, list[str]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = main(["convert", str(src), str(dst)])
    return rc, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize(
    "name", ["resident.safetensors", "ffn.bin", "tokenizer.json", "bundles.crc32", "manifest.json"]
)
def test_disk_full_while_writing(hf_llama, tmp_path, capsys, monkeypatch, name):
    dst = tmp_path / "out.llmflash"
    _fail(monkeypatch, name, FULL)
    rc, err = _convert(hf_llama.path, dst, capsys)
    assert rc == 2 and len(err) == 1, err
    assert str(dst / name) in err[0] and "No space left on device" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "no store and no temporary folder left"


def test_safetensors_error_while_writing_resident(hf_llama, tmp_path, capsys, monkeypatch):
    from safetensors import SafetensorError

    dst = tmp_path / "out.llmflash"
    _fail(monkeypatch, "resident.safetensors", SafetensorError("Error while serializing: IoError(...)"))
    rc, err = _convert(hf_llama.path, dst, capsys)
    assert rc == 2 and len(err) == 1 and str(dst / "resident.safetensors") in err[0], err
    assert "Traceback" not in err[0] and list(tmp_path.iterdir()) == []


def test_disk_full_through_the_api_is_a_convert_error(tmp_path, monkeypatch):
    _fail(monkeypatch, "ffn.bin", FULL)
    with pytest.raises(ConvertError, match=r"ffn\.bin: cannot write: No space left on device"):
        write_store(tmp_path / "s.llmflash")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("what", ["nan-resident", "overflow-resident", "inf-ffn"])
def test_non_finite_weights_are_refused(tmp_path, what):
    config = tiny_config()
    g = torch.Generator().manual_seed(0)
    resident = {k: torch.randn(s, generator=g) for k, s in expected_resident(config).items()}
    up = torch.randn(48, config.dim, generator=g)
    if what == "nan-resident":
        resident["layers.1.attn.k.weight"][3, 4] = float("nan")
    elif what == "overflow-resident":
        resident["norm.weight"][0] = 1e6  # finite in float32, Inf in float16
    else:
        up[5, 6] = float("-inf")
    with pytest.raises(ConvertError) as e:
        with W.StoreWriter(tmp_path / "s.llmflash", config, "float16") as w:
            w.write_resident(resident)
            w.write_layer(0, up=up, down=torch.randn(config.dim, 48), gate=torch.randn(48, config.dim))
    name = {"nan-resident": "layers.1.attn.k.weight", "overflow-resident": "norm.weight", "inf-ffn": "layer 0's FFN"}[
        what
    ]
    assert name in str(e.value) and "non-finite" in str(e.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "dtype,value,where",
    [("q4_1", -1e5, "ffn"), ("q8_0", 1e7, "ffn"), ("q4_1", -1e5, "resident")],
)
def test_quantized_block_scales_that_overflow_are_refused(tmp_path, dtype, value, where):
    """Finite weights whose block scale (or q4_1's minimum) overflows float16 would make a store
    that computes NaN: the conversion fails naming the tensor, and leaves no store."""
    config = tiny_config()
    g = torch.Generator().manual_seed(0)
    dst = tmp_path / "q.llmflash"
    resident = {k: torch.randn(s, generator=g) for k, s in expected_resident(config).items()}
    n, d = config.ffn_dims[0], config.dim
    up = torch.randn(n, d, generator=g)
    if where == "ffn":
        up[0, 0] = value
    else:
        resident["layers.0.attn.q.weight"][0, 0] = value
    with pytest.raises(ConvertError, match="layer 0's FFN up|resident tensor layers.0.attn.q.weight"):
        with W.StoreWriter(dst, config, dtype) as w:
            w.write_resident(resident)
            w.write_layer(0, up=up, down=torch.randn(d, n, generator=g), gate=torch.randn(n, d, generator=g))
    assert not dst.exists()
