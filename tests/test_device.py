"""`--device` / `device=`: where the weights live and the math runs (llmflash.device).

CI has no GPU: the tests marked `cuda` skip there. The GPU code paths (products in the weights'
dtype through torch, attention without the native kernel, naive's upload into a device buffer)
also run on the CPU under `gpu_paths`, which makes every llmflash module that asks `on_cpu`
hear "no": those paths must give the reference's logits (transformers, or the independent
OpenELM forward) like the CPU paths do."""

from __future__ import annotations

import sys
import warnings

import numpy as np
import pytest
import torch
from conftest import tiny_tokenizer_json
from openelm_builders import V, hf_config, random_weights, ref_forward, save_openelm

from llmflash.api import FlashModel
from llmflash.cli import main
from llmflash.convert.hf import convert_hf
from llmflash.device import resolve_device
from llmflash.errors import InvalidArgumentError
from llmflash.models.transformer import Transformer
from llmflash.store import Store
from llmflash.strategies import make_ffn
from llmflash.strategies.dense import DenseFFN
from llmflash.strategies.flash import model_bytes
from llmflash.strategies.naive import NaiveFFN

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch sees none)")
OFF_CPU = torch.device("meta")  # a device that is not the CPU, on any machine
TOL32 = 1e-4


def patch_on_cpu(monkeypatch) -> None:
    """Every llmflash module's `on_cpu` answers False: the GPU branches run on CPU tensors."""
    import llmflash.device
    import llmflash.models.layers  # noqa: F401  (loaded, so patched)
    import llmflash.strategies.base  # noqa: F401

    real, patched = llmflash.device.on_cpu, []
    for name, mod in list(sys.modules.items()):
        if name.startswith("llmflash.") and mod is not llmflash.device and getattr(mod, "on_cpu", None) is real:
            monkeypatch.setattr(mod, "on_cpu", lambda t: False)
            patched.append(name)
    assert {"models.layers", "models.transformer", "strategies.base", "strategies.dense", "strategies.naive"} <= {
        n.removeprefix("llmflash.") for n in patched
    }


@pytest.fixture
def gpu_paths(monkeypatch):
    patch_on_cpu(monkeypatch)


def convert(src, tmp_path, dtype="float32", **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no tokenizer.json"
        return convert_hf(src, tmp_path / f"{dtype}.llmflash", dtype=dtype, **kw)


def ids(n: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 120, (n,), generator=torch.Generator().manual_seed(seed))


def logits(store, strategy: str, device: str = "cpu") -> torch.Tensor:
    return FlashModel.open(store, strategy=strategy, device=device).logits(ids())


# -- naming a device --------------------------------------------------------------------------------
def test_names_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for spec in (None, "cpu", " CPU ", "auto", torch.device("cpu")):
        assert resolve_device(spec) == torch.device("cpu")
    with pytest.raises(InvalidArgumentError, match="torch sees no CUDA GPU"):
        resolve_device("cuda")
    for bad in ("tpu", "cuda:x", "", "gpu0"):
        with pytest.raises(InvalidArgumentError, match="not a device name"):
            resolve_device(bad)
    for other in ("mps", "meta"):
        with pytest.raises(InvalidArgumentError, match="not supported"):
            resolve_device(other)


def test_names_with_one_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto") == resolve_device("cuda") == resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(InvalidArgumentError, match="sees 1 CUDA GPU"):
        resolve_device("cuda:1")


# -- the GPU paths, run on the CPU --------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "opt"])
@pytest.mark.parametrize("strategy", ["dense", "naive"])
def test_gpu_paths_match_transformers(kind, strategy, make_hf, tmp_path, gpu_paths):
    hf = make_hf(kind, kind)
    store = convert(hf.path, tmp_path)
    with torch.no_grad():
        ref = hf.model(ids()[None]).logits[0].float()
    model = FlashModel.open(store, strategy=strategy)
    assert isinstance(model.ffn, NaiveFFN) == (strategy == "naive")
    if strategy == "naive":
        assert model.ffn.dev_bytes is not None  # the upload path ran
    assert (model.logits(ids()) - ref).abs().max().item() <= TOL32


def test_gpu_paths_openelm_and_decode(tmp_path, gpu_paths):
    w = random_weights()
    src = save_openelm(tmp_path / "hf", hf_config(), w)
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text(tiny_tokenizer_json(V))
    store = convert(src, tmp_path, tokenizer=tmp_path / "tok")
    x = ids()
    ref = ref_forward(w, x)
    for strategy in ("dense", "naive"):
        m = FlashModel.open(store, strategy=strategy)
        assert (m.logits(x) - ref).abs().max().item() <= TOL32
        # token by token through the KV cache: decode attention without the native kernel
        cache = m.model.new_cache(len(x))
        steps = torch.cat([m.model.forward(x[t : t + 1], cache) for t in range(len(x))])
        assert (steps - ref).abs().max().item() <= TOL32


def test_gpu_paths_float16_close_to_cpu(make_hf, tmp_path, monkeypatch):
    store = convert(make_hf("llama", "llama").path, tmp_path, "float16")
    cpu = logits(store, "dense")
    patch_on_cpu(monkeypatch)
    for strategy in ("dense", "naive"):
        off = logits(store, strategy)
        assert ((off - cpu).norm() / cpu.norm()).item() <= 1e-2


class Scripted:
    """Wanted sets (original ids) from a seeded generator, one per call and independent of the
    input: two flash runs over the same tokens see the same sets, so their caches evict, move,
    fill and overflow alike."""

    def __init__(self, dims: list[int], share: float, seed: int = 0):
        self.dims, self.share, self.rng = dims, share, np.random.default_rng(seed)

    def __call__(self, layer: int, x: torch.Tensor) -> np.ndarray:
        return np.flatnonzero(self.rng.random(self.dims[layer]) < self.share)


def flash_logits(store, fill_holes: bool, steps: int = 10, lookahead=False, device="cpu"):
    s = Store(store)
    resident, ffn = model_bytes(s)
    scratch = max(L.n_neurons for L in s.layers) * s.layers[0].bundle_bytes
    m = FlashModel.open(
        store,
        memory=resident + scratch + ffn // 3,  # a third of the FFN cached: evictions and overflow
        window=1,
        sparsity=Scripted(s.config.ffn_dims, 0.45),
        fill_holes=fill_holes,
        lookahead=lookahead,
        device=device,
    )
    x = ids(steps)
    cache = m.model.new_cache(steps)
    out = torch.cat([m.model.forward(x[:4], cache), *[m.model.forward(x[t : t + 1], cache) for t in range(4, steps)]])
    return out.cpu(), m.stats()


LOOKAHEADS = [("llama", False), ("opt", False), ("llama", "layer"), ("opt", "attention")]


@pytest.mark.parametrize("kind, lookahead", LOOKAHEADS)
@pytest.mark.parametrize("fill_holes", [True, False])
def test_gpu_paths_flash_equals_the_cpu_cache(kind, lookahead, fill_holes, make_hf, tmp_path, monkeypatch):
    """Flash with its rows kept outside the Rust cache (external rows: moves, landed fills and
    overflow chunks sent up, as on a GPU) computes what the CPU cache computes, with or without
    lookahead (admissions begun a layer early, guesses checked at the layer)."""
    store = convert(make_hf(kind, kind).path, tmp_path)
    cpu, cpu_stats = flash_logits(store, fill_holes, lookahead=lookahead)
    patch_on_cpu(monkeypatch)
    ext, st = flash_logits(store, fill_holes, lookahead=lookahead)
    assert st["misses"] == cpu_stats["misses"] > 0 and st["overflow"] == cpu_stats["overflow"] > 0
    assert st["device_rows_landed"] == st["misses"] and st["device_rows_overflow_up"] >= st["overflow"]
    if not fill_holes:
        assert st["device_rows_moved"] > 0  # the paper's swap-delete, replayed on the rows
    if lookahead:
        assert st["ahead_read"] == cpu_stats["ahead_read"] > 0 and st["guess_admissions"] > 0
    assert (ext - cpu).abs().max().item() <= 1e-5


def test_gpu_paths_flash_every_neuron_equals_dense(make_hf, tmp_path, gpu_paths):
    store = convert(make_hf("opt", "opt").path, tmp_path)
    dense = logits(store, "dense")
    m = FlashModel.open(store, memory="1x", window=2, sparsity="all")
    assert m.ffn.device is not None  # the external-rows path
    assert (m.logits(ids()) - dense).abs().max().item() <= TOL32


# -- what runs on the CPU only --------------------------------------------------------------------
def test_cpu_only_parts_refuse_another_device(make_hf, tmp_path):
    hf = make_hf("llama", "llama")
    q = Store(convert(hf.path, tmp_path, "q4_0"))
    for build in (
        lambda: Transformer.from_store(q, None, device=OFF_CPU),
        lambda: DenseFFN(q, device=OFF_CPU),
        lambda: NaiveFFN(q, device=OFF_CPU),
        lambda: make_ffn("flash", q, device=OFF_CPU, memory="1x", sparsity="all"),
    ):
        with pytest.raises(InvalidArgumentError, match="quantized store runs on the CPU only") as e:
            build()
        assert str(q.path) in str(e.value)


def test_cli_device_errors_exit_2(make_hf, tmp_path, capsys, monkeypatch):
    store = str(convert(make_hf("llama", "llama").path, tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for argv, what in (
        (["generate", store, "-p", "t1", "-n", "1", "--device", "tpu"], "not a device name"),
        (["generate", store, "-p", "t1", "-n", "1", "--device", "cuda"], "no CUDA GPU"),
        (["bench", store, "--tokens", "1", "--strategies", "naive", "--device", "cuda"], "no CUDA GPU"),
        (["eval", store, "--device", "tpu"], "not a device name"),
    ):
        rc = main(argv)
        err = capsys.readouterr().err
        assert rc == 2 and what in err and "Traceback" not in err, err


def test_cpu_device_is_the_default(make_hf, tmp_path):
    store = convert(make_hf("llama", "llama").path, tmp_path)
    m = FlashModel.open(store, strategy="naive", device="cpu")
    assert m.stats()["device"] == "cpu" and m.ffn.dev_bytes is None
    assert torch.equal(m.logits(ids()), logits(store, "naive"))


# -- on a GPU ---------------------------------------------------------------------------------------
@cuda
@pytest.mark.parametrize("kind", ["llama", "opt"])
@pytest.mark.parametrize("strategy", ["dense", "naive"])
def test_cuda_matches_cpu(kind, strategy, make_hf, tmp_path):
    store32 = convert(make_hf(kind, kind).path, tmp_path)
    assert (logits(store32, strategy, "cuda") - logits(store32, strategy)).abs().max().item() <= TOL32
    store16 = convert(make_hf(kind, kind).path, tmp_path, "float16")
    gpu, cpu = logits(store16, strategy, "cuda"), logits(store16, strategy)
    assert ((gpu - cpu).norm() / cpu.norm()).item() <= 1e-2


@cuda
def test_cuda_openelm_matches_reference(tmp_path):
    w = random_weights()
    src = save_openelm(tmp_path / "hf", hf_config(), w)
    store = convert(src, tmp_path)
    for strategy in ("dense", "naive"):
        assert (logits(store, strategy, "cuda") - ref_forward(w, ids())).abs().max().item() <= TOL32


@cuda
def test_cuda_generates_paris():
    m = FlashModel.open(strategy="naive", device="cuda")
    assert "Paris" in m.generate("The capital of France is", max_new_tokens=8)
    s = m.stats()
    assert s["device"].startswith("cuda") and s["device_allocated_bytes"] > 0


# -- the upload path's ordering (CudaBackend's calls, recorded) ------------------------------------
class Recording:
    """A backend that does every copy at once and logs the stream calls Uploader makes."""

    def __init__(self):
        self.log: list[str] = []
        self.events = 0

    def pinned(self, shape, dtype):
        return torch.empty(shape, dtype=dtype)

    def copy_waits_for_compute(self):
        self.log.append("copy stream waits for compute")

    def on_copy_stream(self):
        import contextlib

        return contextlib.nullcontext()

    def record(self):
        self.events += 1
        self.log.append(f"record {self.events}")
        return self.events

    def host_wait(self, event):
        self.log.append(f"host waits {event}")

    def compute_waits(self, event):
        self.log.append(f"compute waits {event}")


def test_uploader_orders_its_copies():
    from llmflash.strategies.flash.device_rows import Uploader

    rec = Recording()
    up = Uploader(torch.device("cpu"), 3, torch.float32, chunk_rows=2, backend=rec)
    dst = torch.zeros(12, 3)
    host = torch.arange(27, dtype=torch.float32).view(9, 3)
    rows = np.array([11, 0, 5, 3, 7, 1, 9, 2, 4])
    assert up.upload(dst, rows, host) == 9
    assert torch.equal(dst[torch.from_numpy(rows)], host)
    assert dst[[6, 8, 10]].abs().sum() == 0
    # 5 chunks through 2 page-locked buffers: each refill waits for the copy that read it last
    assert rec.log == [
        "copy stream waits for compute",
        "record 1",
        "record 2",
        "host waits 1",
        "record 3",
        "host waits 2",
        "record 4",
        "host waits 3",
        "record 5",
        "compute waits 5",
    ]
    rec.log.clear()
    up.upload(dst, np.array([6]), host[:1])
    assert rec.log == ["copy stream waits for compute", "host waits 4", "record 6", "compute waits 6"]
    assert up.upload(dst, np.array([], dtype=np.int64), host[:0]) == 0 and up.host_bytes == 2 * 2 * 3 * 4


@cuda
@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_cuda_flash_every_neuron_equals_dense(kind, make_hf, tmp_path):
    store = convert(make_hf(kind, kind).path, tmp_path)
    dense = logits(store, "dense", "cuda")
    m = FlashModel.open(store, memory="1x", window=2, sparsity="all", device="cuda")
    assert (m.logits(ids()) - dense).abs().max().item() <= TOL32


@cuda
def test_cuda_flash_matches_the_cpu_cache(make_hf, tmp_path):
    """Evictions, moves, fills and overflow on GPU rows: the logits of the CPU cache's run."""
    store = convert(make_hf("opt", "opt").path, tmp_path)
    for fill_holes in (True, False):
        cpu, cpu_stats = flash_logits(store, fill_holes)
        gpu, st = flash_logits(store, fill_holes, device="cuda")
        assert st["misses"] == cpu_stats["misses"] > 0 and st["device_rows_landed"] == st["misses"]
        assert (gpu.cpu() - cpu).abs().max().item() <= TOL32


@cuda
def test_cuda_smollm2_flash_at_half_memory_and_bench(capsys):
    m = FlashModel.open(memory="0.5x", device="cuda")
    assert "Paris" in m.generate("The capital of France is", max_new_tokens=8)
    assert m.stats()["device_rows_landed"] > 0
    rc = main(["bench", str(m.store.path), "--device", "cuda", "--memory", "0.5x", "--tokens", "4"])
    out = capsys.readouterr().out
    assert rc == 0 and "naive" in out and "flash 0.5x" in out
