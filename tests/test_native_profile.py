"""The disk profile: JSON round trip and hostile files, interpolation, the bridge rule, and
`llmflash profile-disk` end to end on a small scratch file (short points: a smoke test, not a
measurement)."""

from __future__ import annotations

import json
import os

import pytest

from llmflash import FlashIOError
from llmflash._native import Profile, measure, measure_point
from llmflash.commands.profile_disk import format_table, main
from llmflash.io import default_profile_path, load_profile


def test_default_profile_is_design_table():
    p = Profile.default()
    assert p.sizes == [4096, 16384, 65536, 262144, 1048576] and p.concurrencies == [1, 8, 32]
    assert p.throughput_mbps(4096, 1) == 64.0 and p.throughput_mbps(1 << 20, 32) == 2046.0
    assert 278 < p.throughput_mbps(8192, 32) < 768
    assert p.request_seconds(1 << 20, 32) == pytest.approx((1 << 20) / 2046e6)
    assert p.bridge_gap_bytes(32) == 6 * 4096
    assert "4 KiB" in format_table(p)


def test_json_round_trip_and_hostile_files(tmp_path):
    p = Profile([4096, 65536], [1, 4], [[10.0, 30.0], [200.0, 500.0]], "test")
    q = Profile.from_json(p.to_json())
    assert q == p and q.source == "test" and q.mbps == [[10.0, 30.0], [200.0, 500.0]]
    p.save(tmp_path / "p.json")
    assert Profile.load(tmp_path / "p.json") == p
    good = json.loads(p.to_json())
    for bad in (
        {**good, "format": "x"},
        {**good, "version": 9},
        {**good, "sizes": [4096, 1000]},
        {**good, "mbps": [[1.0, -1.0], [1.0, 1.0]]},
        {**good, "concurrencies": [4, 1]},
        {**good, "mbps": [[1.0]]},
        [1, 2],
    ):
        with pytest.raises(ValueError):
            Profile.from_json(json.dumps(bad))
    with pytest.raises(ValueError, match="JSON"):
        Profile.from_json("{")
    with pytest.raises(ValueError):
        Profile([4096], [1], [[float("nan")]])
    with pytest.raises(FlashIOError):
        Profile.load(tmp_path / "missing.json")


def test_load_profile_defaults_and_corrupt_files(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_profile_path() == tmp_path / "llmflash" / "disk-profile.json"
    assert load_profile() == Profile.default()
    default_profile_path().parent.mkdir(parents=True)
    default_profile_path().write_text("not json")
    with pytest.warns(RuntimeWarning, match="ignoring disk profile"):
        assert load_profile() == Profile.default()
    mine = Profile([4096], [1], [[5.0]], "mine")
    mine.save(default_profile_path())
    assert load_profile() == mine


def test_measure_bad_arguments(tmp_path):
    f = tmp_path / "f.bin"
    f.write_bytes(os.urandom(1 << 16))
    with pytest.raises(ValueError, match="multiple of 4096"):
        measure_point(f, 1000, 1, 0.01)
    with pytest.raises(ValueError, match="concurrency"):
        measure_point(f, 4096, 0, 0.01)
    with pytest.raises(ValueError, match="smaller than one"):
        measure_point(f, 1 << 20, 1, 0.01)
    p = measure(f, [4096, 8192], [1, 2], 0.01)
    assert p.sizes == [4096, 8192] and all(v > 0 for row in p.mbps for v in row)


def test_profile_disk_main(tmp_path, capsys):
    disk = tmp_path / "disk"
    disk.mkdir()
    out, png = tmp_path / "p.json", tmp_path / "disk.png"
    rc = main([str(disk), "--out", str(out), "--plot", str(png), "--seconds", "0.01", "--size-mb", "16"])
    assert rc == 0
    p = Profile.load(out)
    assert p.sizes[0] == 4096 and p.sizes[-1] == 4 << 20 and p.concurrencies == [1, 4, 8, 16, 32]
    assert all(v > 0 for row in p.mbps for v in row)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(disk.iterdir()) == [], "the scratch file must be removed"
    assert "MB/s" in capsys.readouterr().out
    assert main([str(tmp_path / "nope")]) == 2
