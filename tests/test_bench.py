"""`llmflash bench` end to end on a tiny store: the interleaved table, JSON and PNG, and what each
row must satisfy (naive reads the whole FFN every token; the ablation rows read no less than
their minimum; a window never reads more than no window)."""

from __future__ import annotations

import json

from llmflash.cli import main
from llmflash.store import Store


def test_bench_table_json_plot(hf_llama, convert_to, tmp_path, capsys):
    store = convert_to(hf_llama.path, dtype="float16")
    out, png = tmp_path / "b.json", tmp_path / "b.png"
    assert (
        main(
            [
                "bench",
                str(store),
                "--memory",
                "0.9x",
                "--tokens",
                "6",
                "--sparsity",
                "oracle:0.5",
                "--strategies",
                "naive,flash,ablation",
                "--json",
                str(out),
                "--plot",
                str(png),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    rows = {r["strategy"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"naive", "flash 0.9x", "pred only 0.9x", "+window 0.9x"}
    assert all(name in text for name in rows)
    assert png.stat().st_size > 1000
    s = Store(store)
    ffn_mb = sum(L.region_bytes for L in s.layers) / 1e6
    assert abs(rows["naive"]["mb_read_per_token"] - ffn_mb) < 1e-6 and rows["naive"]["x_vs_naive"] == 1.0
    for name in ("flash 0.9x", "pred only 0.9x", "+window 0.9x"):
        r = rows[name]
        assert r["mb_read_per_token"] >= r["mb_min_per_token"] > 0
        assert r["ms_per_token"] > 0 and 0 <= r["hit_rate"] <= 1
    # window 0 keeps nothing between tokens: it reads every wanted neuron every token
    assert rows["pred only 0.9x"]["hit_rate"] == 0.0
    assert rows["+window 0.9x"]["mb_min_per_token"] <= rows["pred only 0.9x"]["mb_min_per_token"]
