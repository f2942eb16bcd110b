"""Each backbone of a run in a child process of its own (``train.backbone_process``).

Why: with XLA (``jit_compile``, the gpu preset's setting) TensorFlow keeps every executable it
compiled in a per-device compilation cache for the life of the process, and no call empties it:
+0.7-0.8 GiB of host memory a backbone (``bench/backbone_memory.py``), which
``fit.release_backbone`` cannot free. A process that ends takes everything with it.

How: the parent (``python -m lungtf.train``) holds the run directory's lock, makes the split,
then starts ``python -m lungtf.train.isolate RUN_DIR ENTRY --parent PID`` for every backbone
without a ``result.json``, one after the other. The child reads the run's ``config.yaml`` and
``splits.csv``, trains that one backbone with ``fit.train_backbone`` (resuming from its backups
after an interruption) and appends its log to the run's ``train.log``; the parent relays its
output, then reads ``result.json`` for the comparison and packages the best as in-process.
A child that fails stops the run (``BackboneProcessFailed``, naming the backbone); SIGINT or
SIGTERM of the parent stops the child, and a child ends when its parent dies (Linux).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from lungtf.config import AUTO, RunConfig, TrainConfig, from_dict, load_yaml

log = logging.getLogger("lungtf.train")


class BackboneProcessFailed(RuntimeError):
    """A backbone's child process ended without a result; the message names the backbone."""


def resolve_backbone_process(
    requested: bool | str, jit_compile: bool, backbones: int, multi_worker: bool
) -> bool:
    """Whether each backbone trains in a child process.

    Args:
        requested: ``TrainConfig.backbone_process`` (``auto``, ``True``, ``False``).
        jit_compile: whether the train step is compiled with XLA (resolved).
        backbones: how many backbones the run trains.
        multi_worker: several workers (``TF_CONFIG``): they always train in their own processes.
    """
    if multi_worker:
        return False
    if requested == AUTO:
        return jit_compile and backbones > 1
    return bool(requested)


def planned_jit(train: TrainConfig, gpus: int) -> bool:
    """XLA as ``runtime.resolve_jit`` decides it, without building the distribution strategy:
    on a GPU that would reserve the device's memory in the parent, leaving none to its
    children. XLA needs a single replica (``auto``: and a GPU)."""
    from lungtf.train.runtime import resolve_jit

    if train.jit_compile is False:
        return False
    mirrored = train.distribution == "mirrored" or (train.distribution == AUTO and gpus > 1)
    if mirrored and gpus != 1:
        import tensorflow as tf

        if gpus or len(tf.config.list_logical_devices("CPU")) > 1:
            return False  # several replicas: no XLA (the runtime's resolve_jit warns why)
    return resolve_jit(train.jit_compile, gpus, replicas=1)


def _unimportable(entries: tuple[str, ...]) -> list[str]:
    """The entries whose backbone a fresh process cannot register: built by a function in
    ``__main__`` or inside another function."""
    from lungtf.models import get_spec

    bad = []
    for entry in entries:
        build = get_spec(entry.split(":")[0]).build
        if build.__module__ == "__main__" or "<locals>" in build.__qualname__:
            bad.append(f"{entry} ({build.__module__}.{build.__qualname__})")
    return bad


def in_child_processes(cfg: RunConfig) -> bool:
    """``resolve_backbone_process`` for ``cfg`` on this machine, with the reason logged.

    Raises:
        ValueError: ``backbone_process`` is ``True`` but a backbone is registered where a child
            process cannot import it.
    """
    from lungtf.train.multiworker import worker_role
    from lungtf.train.runtime import visible_gpus

    requested, multi = cfg.train.backbone_process, worker_role(cfg.train.distribution) is not None
    jit = planned_jit(cfg.train, visible_gpus()) if not multi else False
    if not resolve_backbone_process(requested, jit, len(cfg.backbones), multi):
        if multi and requested is not False:
            log.info("backbone_process %s: a multi-worker run trains every backbone in this "
                     "process (the workers' processes start together)", requested)
        return False
    bad = _unimportable(cfg.backbones)
    if bad and requested is True:
        raise ValueError(
            f"backbone_process true: a child process cannot register {', '.join(bad)}; "
            "register it at the top level of an importable module, or use "
            "--backbone-process false"
        )
    if bad:
        log.info("backbone_process auto: training in this process, as a child process cannot "
                 "register %s", ", ".join(bad))
        return False
    log.info("each backbone trains in a process of its own (backbone_process %s%s)", requested,
             ", XLA on: its compiled code is freed when the process ends" if jit else "")
    return True


def train_in_children(cfg: RunConfig, run_dir: Path, verbose: int) -> list[dict]:
    """Train every backbone of ``cfg`` not yet done in a child process; their ``result.json``s.

    Raises:
        BackboneProcessFailed: a child exited non-zero, was killed, or wrote no result.
    """
    from lungtf.models import get_spec
    from lungtf.train.fit import entry_dir

    builders = {get_spec(entry.split(":")[0]).build.__module__ for entry in cfg.backbones}
    modules = sorted(m for m in builders if m.split(".")[0] != "lungtf")  # the others register
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(
        [os.path.abspath(p) for p in sys.path if p != ""] + [os.environ.get("PYTHONPATH", "")]
    )}  # the parent's import path: the child runs the same lungtf and finds the same modules
    results = []
    for entry in cfg.backbones:
        result = entry_dir(run_dir, entry) / "result.json"
        if result.is_file():
            log.info("%s: already trained (result.json), skipped", entry)
        else:
            cmd = [sys.executable, "-m", "lungtf.train.isolate", str(run_dir), entry,
                   "--verbose", str(verbose), "--parent", str(os.getpid())]
            code = run_child(cmd + [a for m in modules for a in ("--import", m)], env)
            how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
            if code or not result.is_file():
                raise BackboneProcessFailed(
                    f"backbone {entry}: its training process {how}"
                    f"{'' if code else ' without writing result.json'}; the run stops (its "
                    f"output is above and in {run_dir / 'train.log'}; finished backbones are "
                    f"kept: continue with --resume {run_dir})"
                )
        results.append(json.loads(result.read_text()))
    return results


def _relay(src, dst) -> None:
    for line in iter(src.readline, b""):
        dst.write(line.decode(errors="replace"))
        dst.flush()


def _raise_exit(signum, frame):
    raise SystemExit(128 + signum)


def run_child(cmd: list[str], env: dict[str, str]) -> int:
    """Run ``cmd`` with its output relayed to ``sys.stdout``/``sys.stderr``; its exit code
    (negative: killed by that signal). SIGINT, or SIGTERM (made to raise ``SystemExit(143)``
    meanwhile, so the lock is released), stops the child: its backups keep its progress."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    relays = [threading.Thread(target=_relay, args=pair, daemon=True)
              for pair in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr))]
    for relay in relays:
        relay.start()
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_exit) if main_thread else None
    try:
        return proc.wait()
    except BaseException:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        for relay in relays:
            relay.join(timeout=10)


def _end_with_parent(parent: int | None) -> None:
    """SIGTERM this process when its parent dies (Linux ``PR_SET_PDEATHSIG``); exit if it
    already has."""
    from lungtf.heap import glibc

    libc = glibc()
    if parent is None or libc is None or not sys.platform.startswith("linux"):
        return
    libc.prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        raise SystemExit(f"the parent process {parent} has ended")


def child_main(argv: list[str] | None = None) -> int:
    """``python -m lungtf.train.isolate RUN_DIR ENTRY``: train one backbone of a run directory."""
    p = argparse.ArgumentParser(prog="python -m lungtf.train.isolate",
                                description="Train backbone ENTRY of run directory RUN_DIR "
                                "(started by python -m lungtf.train; see lungtf.train.isolate).")
    p.add_argument("run_dir", type=Path)
    p.add_argument("entry")
    p.add_argument("--verbose", type=int, default=2)
    p.add_argument("--parent", type=int, help="pid of the process holding the run's lock")
    p.add_argument("--import", dest="modules", action="append", default=[],
                   help="module registering the backbone (repeatable)")
    args = p.parse_args(argv)
    _end_with_parent(args.parent)
    from lungtf.train.cli import _LevelFormatter, _setup_logging
    from lungtf.train.rundir import LOCK_FILE, RunLock

    _setup_logging()
    lock = RunLock.try_acquire(args.run_dir)  # free: run alone; else held by our parent
    holder = (args.run_dir / LOCK_FILE).read_text().strip()
    if lock is None and holder != str(args.parent):
        log.error("%s is locked by process %s, not by this process's parent", args.run_dir, holder)
        return 3
    file_log = logging.FileHandler(args.run_dir / "train.log")
    file_log.setFormatter(_LevelFormatter())
    log.addHandler(file_log)
    try:
        return _train_one(args)
    except KeyboardInterrupt:
        log.error("%s: interrupted", args.entry)
        return 130
    finally:
        log.removeHandler(file_log)
        file_log.close()
        if lock is not None:
            lock.release()


def _train_one(args: argparse.Namespace) -> int:
    import resource

    from lungtf.constants import SPLIT_NAMES
    from lungtf.data.split import read_manifest
    from lungtf.train.fit import entry_dir, train_backbone
    from lungtf.train.runtime import runtime

    for module in args.modules:
        importlib.import_module(module)
    cfg = from_dict(RunConfig, load_yaml(args.run_dir / "config.yaml"))
    cfg.validate()
    if args.entry not in cfg.backbones:
        raise ValueError(f"{args.entry!r} is not a backbone of {args.run_dir}: "
                         f"{', '.join(cfg.backbones)}")
    log.info("%s: training in process %d (parent %s)", args.entry, os.getpid(), args.parent)
    records, _ = read_manifest(args.run_dir / "splits.csv", root=cfg.data.data_root,
                               confine=not cfg.data.allow_outside_root)
    splits = {name: [r for r in records if r.split == name] for name in SPLIT_NAMES}
    with runtime(cfg.train) as rt:
        train_backbone(args.entry, cfg, rt, splits, entry_dir(args.run_dir, args.entry),
                       args.verbose)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    log.info("%s: process %d ends, peak RSS %.0f MiB", args.entry, os.getpid(), peak)
    return 0


if __name__ == "__main__":
    sys.exit(child_main())
