"""Multi-worker training for real: two ``python -m lungtf.train`` processes on 127.0.0.1, each
with its own ``TF_CONFIG``, train one tiny model on real shared tiles with
``MultiWorkerMirroredStrategy`` over gRPC; one worker is killed with SIGKILL mid-training and
both are started again. Checks: the restarted workers both finish, continue from the chief's
backup (not from epoch 0), the chief alone wrote the run directory (no second run directory, no
worker directory left), and both workers end with the same weights.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import probe_source

from lungtf.train.multiworker import WORKERS_DIR, Role, worker_role

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 3
NAME = "mw"
BACKBONE = "mw_probe"
BACKBONE_DIR = "mw_probe"
PROBE_TRAIN = probe_source(BACKBONE) + """
import runpy

runpy.run_module("lungtf.train", run_name="__main__", alter_sys=True)
"""
"""``python -m lungtf.train`` with a two-convolution backbone registered first: what is checked
(roles, chief-only writes, backup resume, agreement) does not depend on the backbone, and each
of the four processes spent most of its CPU tracing a real backbone's distributed train step."""


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (held together while chosen)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def few_tiles(shared: Path, out: Path, per_class: int = 12) -> Path:
    """A manifest of ``per_class`` real tiles per class, each from another source tile."""
    with open(shared / "groups.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    picked, seen = [], set()
    for row in sorted(rows, key=lambda r: r["path"]):
        label_count = sum(1 for p in picked if p["label"] == row["label"])
        if row["group"] not in seen and label_count < per_class:
            seen.add(row["group"])
            picked.append({**row, "path": str(shared / row["path"])})
    with open(out, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "label", "group"])
        writer.writeheader()
        writer.writerows(picked)
    return out


def start_workers(data: Path, output: Path, logs: Path, attempt: int) -> list[subprocess.Popen]:
    """Start worker 0 (the chief) and worker 1 with the same command and their own TF_CONFIG."""
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(2)]}
    argv = [
        sys.executable, "-c", PROBE_TRAIN, "--preset", "cpu", "--distribution", "multiworker",
        "--data", str(data), "--backbones", BACKBONE, "--weights", "none", "--image-size", "32",
        "--crop-size", "0", "--batch-size", "8", "--scratch-epochs", str(EPOCHS),
        "--output", str(output), "--name", NAME, "--verbose", "0",
    ]  # fmt: skip
    procs = []
    for index in range(2):
        env = {
            **os.environ,
            "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}),
            "CUDA_VISIBLE_DEVICES": "-1",
            "TF_CPP_MIN_LOG_LEVEL": "2",
            "PYTHONPATH": str(REPO),
        }
        with open(logs / f"worker{index}-{attempt}.log", "wb") as log:
            proc = subprocess.Popen(
                argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=log,
                start_new_session=True,
            )  # fmt: skip
            procs.append(proc)
    return procs


def kill(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def tail(path: Path) -> str:
    return path.read_text(errors="replace")[-3000:]


def test_roles_follow_tf_config():
    cluster = {"worker": ["a:1", "b:2"]}

    def role(task, distribution="auto", cluster=cluster):
        env = {"TF_CONFIG": json.dumps({"cluster": cluster, "task": task})}
        return worker_role(distribution, env)

    assert role({"type": "worker", "index": 0}) == Role("worker", 0, chief=True)
    assert role({"type": "worker", "index": 1}) == Role("worker", 1, chief=False)
    with_chief = {"chief": ["c:3"], **cluster}
    assert role({"type": "worker", "index": 0}, cluster=with_chief).chief is False
    assert role({"type": "chief", "index": 0}, cluster=with_chief).chief is True
    assert role({"type": "worker", "index": 1}, distribution="none") is None
    assert worker_role("auto", {}) is None
    with pytest.raises(ValueError, match="'evaluator'"):
        role({"type": "evaluator", "index": 0})


def test_two_workers_resume_after_sigkill_and_agree(shared_data, tmp_path):
    data = few_tiles(shared_data, tmp_path / "tiles.csv")
    output, logs = tmp_path / "runs", tmp_path / "logs"
    logs.mkdir()
    procs = start_workers(data, output, logs, attempt=1)
    try:
        # Kill worker 1 with SIGKILL once the chief has backed up an epoch; the chief, left
        # waiting in a collective, is killed too: both are then started again.
        deadline, done = time.monotonic() + 600, 0
        while done < 1:
            assert time.monotonic() < deadline, tail(logs / "worker0-1.log")
            assert all(p.poll() is None for p in procs), (
                tail(logs / "worker0-1.log") + tail(logs / "worker1-1.log")
            )
            for run in output.glob(f"*-{NAME}"):
                metadata = run / BACKBONE_DIR / "backup" / "scratch" / "training_metadata.json"
                done = json.loads(metadata.read_text())["epoch"] if metadata.is_file() else 0
            time.sleep(0.05)
        os.killpg(procs[1].pid, signal.SIGKILL)
        assert procs[0].poll() is None, "training finished before the kill: make it longer"
        kill(procs)
        assert done < EPOCHS
        history_at_kill = (run / BACKBONE_DIR / "history.csv").read_text().splitlines()
        assert (output / WORKERS_DIR / NAME / "worker-1").is_dir()  # worker 1 wrote there

        procs = start_workers(data, output, logs, attempt=2)
        for index, proc in enumerate(procs):
            code = proc.wait(timeout=600)
            assert code == 0, tail(logs / f"worker{index}-2.log")
    finally:
        kill(procs)

    # The chief alone wrote the run directory: one run, no worker directory left.
    assert [p.name for p in output.iterdir()] == [run.name]
    assert (run / "comparison.md").is_file() and any((run / "best" / "saved_model").iterdir())
    assert not list(run.rglob(".tmp-*"))

    # Both resumed from the chief's backup instead of starting again at epoch 0.
    chief, worker = ((logs / f"worker{i}-2.log").read_text() for i in range(2))
    for log in (chief, worker):
        restored = re.search(r"scratch: backup restored, (\d+) epoch\(s\) done", log)
        assert restored and int(restored.group(1)) >= done, log[-3000:]
    assert "resuming unfinished run" in chief and "worker-1 of a multi-worker run" in worker
    rows = (run / BACKBONE_DIR / "history.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == [str(e) for e in range(EPOCHS)]
    assert rows[: done + 1] == history_at_kill[: done + 1]  # epochs before the kill kept as is

    # Both workers ended with the same weights (each logs the digest of its own).
    digests = [re.findall(BACKBONE + r": weights digest ([0-9a-f]{16})", log) for log in (chief, worker)]
    assert digests[0] and digests[0] == digests[1]
