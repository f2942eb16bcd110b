"""bench/soak.py at a tiny size against a live dev server: every malformed kind gets its one
expected status, no good call fails, the new version takes over and the old one is unloaded."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from test_export import make_tiny_model

from bench import soak
from lungtf import export


def test_schedule_and_rss_trend() -> None:
    kinds = soak.schedule(1000, 0.2, seed=1)
    assert kinds.count("good") == 800 and len(kinds) == 1000
    assert {kinds.count(k) for k in soak.MALFORMED} <= {18, 19}  # 200 over 11 kinds
    flat = [(i, 750 + i, 1000 * soak.MiB) for i in range(10)]
    assert soak.rss_trend(flat, 1000) == (0.0, 1000.0)
    rising = [(i, d, (1000 + (d - 750) // 10) * soak.MiB) for i, d in enumerate(range(750, 1001))]
    assert soak.rss_trend(rising, 1000)[0] == pytest.approx(25, abs=0.5)  # 1 MiB per 10 calls


def test_soak_at_tiny_size(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base = tmp_path / "given"
    export.export_model(make_tiny_model(size=32), base)
    argv = ["--base-path", str(base), "--requests", "200", "--threads", "4", "--swap-timeout", "90"]
    code = soak.main(argv)
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"model: {base} version 1 (a copy)" in out
    assert "| good | OK 160 | OK |" in out
    for kind, (status,) in soak.EXPECTED.items():
        assert re.search(rf"^\| {kind} \| {status} \d+ \| {status} \|", out, re.MULTILINE), kind
    for event in ("version 2 dropped in", "version 2 AVAILABLE", "version 1 deleted at call 140"):
        assert event in out
    assert "version 1 unloaded" in out
    answered = re.search(r"answered by version: 1: (\d+), 2: (\d+)", out)
    assert answered and int(answered[1]) > 0 and int(answered[2]) > 0
    assert re.search(r"good calls: p50 \d+ ms, p99 \d+ ms", out) and "PASS" in out
    assert [p.name for p in base.iterdir()] == ["1"]  # the given export is left alone
