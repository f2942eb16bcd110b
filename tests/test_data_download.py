"""Download: no network fails at once with the manual steps; data already in --dest is found.

The no-network case points kagglehub at its TEST environment (``KAGGLE_API_ENVIRONMENT=TEST``,
http://localhost:7777), where nothing listens, so the test never downloads 1.7 GB even on a
machine with network.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from lungtf.constants import CLASS_NAMES
from lungtf.data.download import DownloadError, download, kaggle_endpoint, probe


@pytest.fixture
def offline_kaggle(monkeypatch) -> tuple[str, int]:
    """Point kagglehub at localhost:7777 and make sure nothing answers there."""
    monkeypatch.setenv("KAGGLE_API_ENVIRONMENT", "TEST")
    host, port = kaggle_endpoint()
    with socket.socket() as s:
        if s.connect_ex((host, port)) == 0:
            pytest.skip(f"something listens on {host}:{port}; cannot simulate a missing network")
    return host, port


def test_without_network_fails_at_once_with_manual_steps(offline_kaggle, tmp_path: Path):
    start = time.monotonic()
    with pytest.raises(DownloadError) as err:
        download(tmp_path / "lc25000", timeout=2.0)
    assert time.monotonic() - start < 5
    message = str(err.value)
    assert f"{offline_kaggle[0]}:{offline_kaggle[1]}" in message
    for hint in ("--data DIR", "LUNGTF_DATA", "data/", *CLASS_NAMES):
        assert hint in message


def test_probe_reports_unreachable_host():
    with socket.socket() as s:  # a port that was free a moment ago: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert "cannot connect to 127.0.0.1" in probe("127.0.0.1", port, timeout=1.0)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        assert probe("127.0.0.1", server.getsockname()[1], timeout=1.0) is None


def test_dest_that_already_holds_the_data_is_not_downloaded(offline_kaggle, tiny_folder: Path):
    root = tiny_folder.parent / "lung_colon_image_set"
    root.mkdir()
    tiny_folder.rename(root / "lung_image_sets")
    assert download(root.parent) == root / "lung_image_sets"



def test_cli_download(offline_kaggle, tiny_folder: Path, tmp_path: Path, capsys):
    from lungtf.data.__main__ import main

    assert main(["download", "--dest", str(tmp_path / "empty"), "--timeout", "1"]) == 1
    assert "place LC25000 by hand" in capsys.readouterr().err
    assert main(["download", "--dest", str(tiny_folder)]) == 0
    out = capsys.readouterr().out
    assert f"LC25000 lung tiles are in {tiny_folder}" in out and f"--data {tiny_folder}" in out
