"""llama.cpp's `llama-bench`, the reference local users pick: built once from the source that ships
inside llama-cpp-python's source package on PyPI, then run for prompt (pp) and generation (tg)
tokens/s.

    python benches/llama_bench.py --build DIR     # about 6 minutes on 2 cores; prints the binary

Not part of CI (CI never builds llama.cpp). The source package is fetched from PyPI's JSON API
(the registry is the one network these machines reach); building needs cmake (`pip install
cmake`) and a C++ compiler.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tarfile
import urllib.request
from pathlib import Path

PACKAGE = "llama-cpp-python"
PYPI = "https://pypi.org"


def build(dest: Path, version: str | None = None) -> Path:
    """Download llama-cpp-python's sdist into `dest`, build llama-bench from its vendor/llama.cpp
    (native CPU features, no network code), return the binary. Reuses an earlier build."""
    dest.mkdir(parents=True, exist_ok=True)
    found = sorted(dest.glob("*/vendor/llama.cpp/build/bin/llama-bench"))
    if found:
        return found[-1]
    url = f"{PYPI}/pypi/{PACKAGE}/{version}/json" if version else f"{PYPI}/pypi/{PACKAGE}/json"
    meta = json.load(urllib.request.urlopen(url))
    sdist = next(f for f in meta["urls"] if f["packagetype"] == "sdist")
    link = sdist["url"] if "://" in sdist["url"] else f"{PYPI}/{sdist['url'].lstrip('./')}"
    archive = dest / sdist["filename"]
    urllib.request.urlretrieve(link, archive)
    with tarfile.open(archive) as t:
        t.extractall(dest, filter="data")
    src = next(dest.glob("*/vendor/llama.cpp"))
    # The CPU's own features. With AMX, llama.cpp repacks Q4/Q8 weights for its AMX/AVX512-VNNI
    # kernels: one-token decode 2.6x faster than a build without AMX on this machine; a VM that
    # lists AMX but refuses its tiles kills the prompt pass (SIGILL), which `run` reports as NaN.
    flags = ["-DLLAMA_CURL=OFF", "-DGGML_NATIVE=ON", "-DCMAKE_BUILD_TYPE=Release"]
    subprocess.run(["cmake", "-S", src, "-B", src / "build", *flags], check=True, capture_output=True)
    subprocess.run(["cmake", "--build", src / "build", "--target", "llama-bench", "-j"], check=True)
    return src / "build" / "bin" / "llama-bench"


def run(
    binary: Path, gguf: Path, threads: int, prompt: int, new: int, reps: int = 1, passes: tuple[str, ...] = ("pp", "tg")
) -> dict[str, float]:
    """{"pp": prompt tokens/s, "tg": generated tokens/s}, each from its own llama-bench run (its
    mean over `reps` repetitions); NaN for a pass that died of a signal (the prompt pass of an
    AMX build in a VM that refuses AMX tiles)."""
    speeds = {}
    for name, p, n in (("pp", prompt, 0), ("tg", 0, new)):
        if name not in passes:
            continue
        cmd = [binary, "-m", gguf, "-t", threads, "-p", p, "-n", n, "-r", reps, "-o", "json"]
        done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
        if done.returncode < 0:
            speeds[name] = float("nan")
            continue
        if done.returncode:
            raise RuntimeError(f"llama-bench failed ({done.returncode}): {done.stderr[-500:]}")
        speeds.update(parse(done.stdout))
    return speeds


def parse(stdout: str) -> dict[str, float]:
    """{"pp" or "tg": tokens/s} from llama-bench's `-o json` output."""
    return {("pp" if row["n_prompt"] else "tg"): float(row["avg_ts"]) for row in json.loads(stdout)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build", type=Path, required=True, help="folder to download and build in")
    ap.add_argument("--version", help="llama-cpp-python version (default: the newest)")
    a = ap.parse_args()
    print(build(a.build, a.version))


if __name__ == "__main__":
    main()
