"""``python -m lungtf.train``: train every backbone on one split, compare them, keep the best.

Configuration: dataclass defaults, then the preset (``--preset``, else chosen from the hardware:
``gpu`` with a GPU visible, ``cpu`` otherwise), then ``--config my.yaml``, then flags; validated
before anything runs and written to the run directory as ``config.yaml``, with the data that was
found automatically (no ``--data``) written in as an absolute path.

Resume: the run directory is ``<output>/<UTC timestamp>-<name>``. Started again with the same
command (same resolved configuration and ``--name``), the newest unfinished run directory of that
name is re-used and training continues where it stopped (finished backbones and phases are
skipped, the current phase resumes at its last finished epoch). ``--resume RUN_DIR`` continues a
given run directory with the configuration stored in it; ``--new`` always starts a fresh one.

Locking: the run directory is locked for as long as training runs (``lungtf.train.rundir``). A
second identical command never trains into a directory a live process holds: it skips it (and
resumes an older unfinished one, or starts fresh); ``--resume`` of a held directory exits with
code 3. Every file of the run directory is written atomically, so a SIGKILL at any moment leaves
a run that resumes.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import replace
from pathlib import Path

import yaml

from lungtf.config import (
    DISTRIBUTIONS,
    GROUPING_STRICTNESS,
    INPUT_NORMS,
    PRECISIONS,
    PRESETS,
    SCHEDULES,
    RunConfig,
    dump_yaml,
    from_dict,
    load_yaml,
    resolve_run_config,
    same_config,
)
from lungtf.train.rundir import RunDirBusy, RunLock, atomic_path, claim_new, remove_temporaries

log = logging.getLogger("lungtf.train")


AUTO_BOOL = {"auto": "auto", "true": True, "false": False}
"""Values of ``--jit-compile`` / ``--device-augment``, any case (``True`` as ``--help`` shows it)."""


def _flag_bool(value: str) -> bool | str:
    """``auto``/``true``/``false`` in any case; anything else is argparse's clean usage error."""
    try:
        return AUTO_BOOL[value.strip().lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(
            f"invalid value {value!r}; allowed are auto, true, false (any case, e.g. True)"
        ) from None


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags; each maps onto one ``RunConfig`` field."""
    p = argparse.ArgumentParser(
        prog="python -m lungtf.train",
        description="Fine-tune and compare backbones on a leakage-safe grouped split of LC25000 "
        "lung tiles; writes comparison.csv/md and the best model into a run directory.",
    )
    p.add_argument(
        "--data",
        help="class folders, LC25000 root or CSV manifest "
        "(default: $LUNGTF_DATA, data/, ../shared/data/lc25000-lung-224, download)",
    )
    p.add_argument("--splits", help="existing split manifest (path,label,group,split,protocol)")
    p.add_argument("--groups", help="path,label,group CSV (default: groups.csv beside the data)")
    p.add_argument("--data-root",
                   help="folder every image must lie in (default: the class root, or the "
                   "manifest's folder)")
    p.add_argument("--allow-outside-root", action="store_true", default=None,
                   help="read images outside the data root (symlinks or manifest rows leading "
                   "out)")
    p.add_argument("--backbones", help="comma list of name[:variant], e.g. resnet50,regnet:400mf")
    p.add_argument("--preset", choices=PRESETS, help="recipe preset (default: follows hardware)")
    p.add_argument("--config", help="YAML file applied after the preset")
    p.add_argument("--epochs", type=int, help="phase-2 (all layers) epochs of transfer backbones")
    p.add_argument("--head-epochs", type=int, help="phase-1 (frozen backbone) epochs")
    p.add_argument("--scratch-epochs", type=int, help="epochs of from-scratch backbones")
    p.add_argument("--image-size", type=int, help="input side in pixels")
    p.add_argument("--grouping-strictness", choices=GROUPING_STRICTNESS,
                   help="when groups are detected: how readily unsure small groups are merged "
                   "(default safe: merge when unsure)")
    p.add_argument("--crop-size", type=int,
                   help="train on random crops of this side (0: whole tiles); eval on whole tiles")
    p.add_argument("--batch-size", type=int, help="global batch size")
    p.add_argument("--lr", help="peak learning rate, or 'auto' (lr_find)")
    p.add_argument("--schedule", choices=SCHEDULES)
    p.add_argument("--label-smoothing", type=float)
    p.add_argument("--patience", type=int, help="early-stopping patience in epochs (0: off)")
    p.add_argument(
        "--weights",
        help="imagenet, none, a weights file, a KerasHub preset directory or hf:// handle; "
        "per backbone as a comma list NAME=SOURCE (e.g. regnet=regnety016_notop.h5,"
        "resnet50d=DIR), a bare item for the others (default imagenet)",
    )
    p.add_argument("--input-norm", choices=INPUT_NORMS,
                   help="the model's input normalisation: default (the backbone's own, what its "
                   "pretrained weights expect), unit (x/255) or imagenet (ImageNet mean/std); "
                   "other than default only with weights none or lungtf.pretrain weights of it")
    p.add_argument("--augment", help="comma list of augmentations ('' for none)")
    p.add_argument("--cache", action="store_true", default=None, help="cache decoded tiles")
    p.add_argument("--seed", type=int)
    p.add_argument("--precision", choices=PRECISIONS)
    auto_flag = {"type": _flag_bool, "metavar": "{auto,true,false}"}
    p.add_argument("--jit-compile", **auto_flag,
                   help="XLA for the train step: auto (on with a GPU and one replica), true, false "
                   "(any case); off with several replicas, with a warning")
    p.add_argument("--distribution", choices=DISTRIBUTIONS)
    p.add_argument("--device-augment", **auto_flag,
                   help="augment inside the training step: auto (with a GPU), true, false "
                   "(any case)")
    p.add_argument("--ema", type=float, metavar="MOMENTUM",
                   help="validate, checkpoint and export an exponential moving average of the "
                   "weights with this momentum per step, e.g. 0.99 (default: off)")
    p.add_argument("--backbone-process", **auto_flag,
                   help="train each backbone in a child process of its own: auto (with XLA and "
                   "several backbones, so XLA's compiled code is freed after each), true, false")
    p.add_argument("--pretrain-epochs", type=int, metavar="N",
                   help="pretrain each from-scratch backbone (weights none) for N epochs with "
                   "SimSiam on the run's training split, then fine-tune it as a transfer backbone "
                   "(--head-epochs frozen, then --epochs); default 0: off")
    p.add_argument("--output", help="folder of run directories (default runs)")
    p.add_argument("--name", help="run name (default train)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue this run directory")
    p.add_argument("--new", action="store_true", help="never re-use an unfinished run directory")
    p.add_argument("--verbose", type=int, default=2, help="Keras fit verbosity (0, 1, 2)")
    return p


def _overrides(args: argparse.Namespace) -> dict:
    """Nested ``RunConfig`` mapping of the flags that were given."""

    def csv_list(value):
        return [v.strip() for v in value.split(",") if v.strip()]

    lr = args.lr if args.lr in (None, "auto") else float(args.lr)
    table = {
        "data": {
            "data": args.data,
            "splits": args.splits,
            "groups": args.groups,
            "image_size": args.image_size,
            "crop_size": args.crop_size,
            "grouping_strictness": args.grouping_strictness,
            "batch_size": args.batch_size,
            "seed": args.seed,
            "cache": args.cache,
            "augment": None if args.augment is None else csv_list(args.augment),
            "data_root": args.data_root,
            "allow_outside_root": args.allow_outside_root,
        },
        "model": {"image_size": args.image_size, "weights": args.weights,
                  "input_norm": args.input_norm},
        "train": {
            "epochs": args.epochs,
            "head_epochs": args.head_epochs,
            "scratch_epochs": args.scratch_epochs,
            "lr": lr,
            "schedule": args.schedule,
            "label_smoothing": args.label_smoothing,
            "early_stopping_patience": args.patience,
            "precision": args.precision,
            "jit_compile": args.jit_compile,
            "distribution": args.distribution,
            "device_augment": args.device_augment,
            "ema_momentum": args.ema,
            "backbone_process": args.backbone_process,
            "pretrain_epochs": args.pretrain_epochs,
        },
        "backbones": None if args.backbones is None else csv_list(args.backbones),
        "output": args.output,
        "name": args.name,
    }
    out = {}
    for key, value in table.items():
        if isinstance(value, dict):
            value = {k: v for k, v in value.items() if v is not None}
        if value not in (None, {}):
            out[key] = value
    return out


def _with_found_data(cfg: RunConfig) -> RunConfig:
    """``cfg`` with ``data.data`` set to the data found automatically (``prepare.find_data``),
    as an absolute path, when neither ``--data`` nor ``--splits`` names it: the run's
    ``config.yaml`` then says where its tiles are (the demo's data root), and a rerun of the same
    command finds the same data, so the run resumes."""
    if cfg.data.data or cfg.data.splits:
        return cfg
    from lungtf.train.prepare import find_data

    return replace(cfg, data=replace(cfg.data, data=os.path.abspath(find_data(None))))


def _run_dir(cfg: RunConfig, args: argparse.Namespace) -> tuple[Path, RunLock]:
    """Lock the newest unfinished run directory of this name and configuration that no other
    live process holds, or make and lock a new one (``lungtf.train.rundir``)."""
    root = Path(cfg.output)
    if not args.new and root.is_dir():
        for candidate in sorted(root.glob(f"*-{cfg.name}"), reverse=True):
            config = candidate / "config.yaml"
            if (
                (candidate / "comparison.md").is_file()
                or not config.is_file()
                or not same_config(config, cfg)
            ):
                continue
            lock = RunLock.try_acquire(candidate)
            if lock is None:
                log.info("unfinished run %s is in use by another process; not resumed", candidate)
                continue
            if (candidate / "comparison.md").is_file():  # finished while we looked
                lock.release()
                continue
            log.info("resuming unfinished run %s (same name and configuration)", candidate)
            return candidate, lock
    return claim_new(root, cfg.name)


class _LevelFormatter(logging.Formatter):
    """``time message``, with the level named for warnings and errors (``time WARNING message``)."""

    def __init__(self, datefmt: str | None = None):
        super().__init__("%(asctime)s %(level_prefix)s%(message)s", datefmt)

    def format(self, record: logging.LogRecord) -> str:
        record.level_prefix = f"{record.levelname} " if record.levelno >= logging.WARNING else ""
        return super().format(record)


def _setup_logging() -> None:
    log.setLevel(logging.INFO)
    if not any(getattr(h, "_lungtf", False) for h in log.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_LevelFormatter("%H:%M:%S"))
        handler._lungtf = True
        log.addHandler(handler)


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, train and compare every backbone, package the best; returns 0 on success."""
    args = build_parser().parse_args(argv)
    _setup_logging()
    from lungtf.train.multiworker import worker_role
    from lungtf.train.runtime import choose_preset

    try:
        if args.resume and not _follower_without(Path(args.resume) / "config.yaml"):
            run_dir = Path(args.resume)
            cfg = from_dict(RunConfig, load_yaml(run_dir / "config.yaml"))
            log.info("resuming %s with its own config.yaml (other flags ignored)", run_dir)
        else:
            cfg = resolve_run_config(choose_preset(args.preset), args.config, _overrides(args))
        cfg.validate()
    except (ValueError, OSError, yaml.YAMLError) as err:
        # a bad flag, preset, --config file or stored config.yaml: one line, nothing written
        log.error("invalid configuration: %s", err)
        return 2
    if not args.resume:
        cfg = _with_found_data(cfg)
    role = worker_role(cfg.train.distribution)
    if role is not None and not role.chief:
        return _follow_chief(cfg, role, args.verbose)
    try:
        run_dir, lock = (run_dir, RunLock.acquire(run_dir)) if args.resume else _run_dir(cfg, args)
    except RunDirBusy as err:
        log.error("%s", err)
        return 3
    try:
        if remove_temporaries(run_dir):
            log.info("removed the temporary files of an interrupted write in %s", run_dir)
        with atomic_path(run_dir / "config.yaml") as tmp:
            dump_yaml(cfg, tmp)
        file_log = logging.FileHandler(run_dir / "train.log")
        file_log.setFormatter(_LevelFormatter())
        log.addHandler(file_log)
        try:
            if args.preset is None and not args.resume:
                log.info("preset %s chosen from the hardware (no --preset given)", cfg.preset)
            return _train_all(cfg, run_dir, args.verbose)
        finally:
            log.removeHandler(file_log)
            file_log.close()
    finally:
        lock.release()


def _follower_without(config: Path) -> bool:
    """Whether this is a non-chief worker that cannot read ``config`` (``--resume`` on another
    machine than the chief's): it then resolves its flags and trains with the chief's config."""
    from lungtf.train.multiworker import worker_role

    role = worker_role("multiworker")
    return role is not None and not role.chief and not config.is_file()


def _follow_chief(cfg: RunConfig, role, verbose: int) -> int:
    """Train as a non-chief worker, in a worker directory removed at the end
    (``lungtf.train.multiworker``); the chief writes the run directory."""
    from lungtf.train.multiworker import claim_worker_dir, remove_worker_dir

    try:
        work, lock = claim_worker_dir(cfg.output, cfg.name, role)
    except RunDirBusy as err:
        log.error("%s", err)
        return 3
    log.info("%s of a multi-worker run: the chief writes the run directory", role.name)
    try:
        return _train_all(cfg, work, verbose)
    finally:
        remove_worker_dir(work, lock)


def _train_all(cfg: RunConfig, run_dir: Path, verbose: int) -> int:
    from lungtf.train.fit import entry_dir, release_backbone, train_backbone
    from lungtf.train.isolate import BackboneProcessFailed, in_child_processes, train_in_children
    from lungtf.train.multiworker import barrier, chief_config, mirror_from_chief
    from lungtf.train.prepare import prepare_splits
    from lungtf.train.runtime import runtime

    log.info("run directory: %s (preset %s)", run_dir, cfg.preset or "none")
    if in_child_processes(cfg):  # decided before TensorFlow takes a GPU in this process
        splits, protocol = prepare_splits(cfg.data, run_dir)
        try:
            results = train_in_children(cfg, run_dir, verbose)
        except BackboneProcessFailed as err:
            log.error("%s", err)
            return 1
        _package(cfg, run_dir, results, splits, protocol)
        return 0
    with runtime(cfg.train) as rt:
        cfg = chief_config(rt.strategy, cfg)  # every worker trains with the chief's
        splits = prepare_splits(cfg.data, run_dir) if rt.chief else None
        mirror_from_chief(rt.strategy, run_dir, ["splits.csv"])  # and on the chief's split
        splits, protocol = splits or prepare_splits(cfg.data, run_dir)
        results = []
        for entry in cfg.backbones:
            results.append(
                train_backbone(entry, cfg, rt, splits, entry_dir(run_dir, entry), verbose)
            )
            release_backbone(rt.precision)  # before the next backbone is built
    if not rt.chief:
        barrier(rt.strategy)  # until the chief has packaged the run: the workers end together
        return 0
    _package(cfg, run_dir, results, splits, protocol)
    barrier(rt.strategy)
    return 0


def _package(cfg: RunConfig, run_dir: Path, results: list[dict], splits: dict, protocol: str):
    """Compare the backbones' ``results``, package the best into ``best/``."""
    from lungtf.train.compare import finalize_best, pick_best, write_comparison
    from lungtf.train.fit import entry_dir

    best = pick_best(results)
    best_dir = finalize_best(
        run_dir,
        entry_dir(run_dir, best["entry"]),
        best,
        splits,
        cfg.data.image_size,
        cfg.data.batch_size,
        protocol,
    )
    write_comparison(results, run_dir, protocol, best)
    log.info("comparison: %s; best model: %s", run_dir / "comparison.md", best_dir)
