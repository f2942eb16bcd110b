"""``train.pretrain_epochs`` (``--pretrain-epochs N``): pretrain a from-scratch backbone with
SimSiam on the run's own training split, inside its training, then fine-tune it from those weights.

``lungtf.train.fit.train_backbone`` calls ``pretrain_in_run`` before it builds the classifier, so
it happens wherever the backbone trains (in the run's process, or in its child process with
``lungtf.train.isolate``). ``lungtf.pretrain.cli.pretrain`` does the work with
``lungtf.pretrain``'s default settings (``DEFAULTS``: batch 64, capped at the training tiles,
projection 512, prediction 128, SGD at ``BASE_LR * batch / 256``), the run's seed, its tiles
cached at ``data.image_size`` and views of ``data.crop_size`` (``data.image_size`` when 0). Only
the training split's tiles are read, never validation or test (the log says so). It writes into
the backbone's folder::

    <run>/<backbone>/pretrain/<name>-<variant>.weights.h5   the weights (written atomically)
    <run>/<backbone>/pretrain/<name>-<variant>.json         settings, tiles, loss and z_std per epoch
    <run>/<backbone>/pretrain/<name>-<variant>/             settings, history.csv, backup/ (resume)

An interrupted pretraining continues after its last finished epoch when the run resumes
(``BackupAndRestore``); a finished one is skipped.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

from lungtf.config import RunConfig
from lungtf.pretrain.cli import DEFAULTS, make_settings, output_paths, pretrain, split_records

log = logging.getLogger("lungtf.train")

PRETRAIN_DIR = "pretrain"
"""Folder of a backbone's pretraining inside its run folder."""


def pretrain_settings(run: RunConfig, tiles: int) -> dict:
    """SimSiam's settings in run ``run`` with ``tiles`` training tiles: ``lungtf.pretrain``'s
    defaults, the run's seed, ``data.image_size`` tiles, ``data.crop_size`` views (whole tiles
    when 0) and ``train.pretrain_epochs`` epochs; the batch is at most the training tiles."""
    d = run.data
    return make_settings(image_size=d.image_size, crop_size=d.crop_size or d.image_size,
                         epochs=run.train.pretrain_epochs,
                         batch_size=min(DEFAULTS["batch_size"], tiles), seed=d.seed,
                         input_norm=run.model.input_norm)


@contextlib.contextmanager
def _relayed(source: logging.Logger, target: logging.Logger):
    """``source``'s INFO lines also go to ``target``'s handlers (stderr and ``train.log``)."""
    added = [h for h in target.handlers if h not in source.handlers]
    level = source.level
    for handler in added:
        source.addHandler(handler)
    source.setLevel(logging.INFO)
    try:
        yield
    finally:
        for handler in added:
            source.removeHandler(handler)
        source.setLevel(level)


def pretrain_in_run(entry: str, run: RunConfig, splits: dict[str, list], out_dir: Path,
                    verbose: int = 2) -> tuple[dict, bool]:
    """Pretrain backbone ``entry`` on ``splits["train"]`` into ``out_dir/pretrain`` (skipped when
    done), log what it was; returns ``(summary, trained_now)``.

    Args:
        entry: a ``RunConfig.backbones`` entry.
        run: the run's configuration (``train.pretrain_epochs`` > 0).
        splits: the run's ``train``/``val``/``test`` records; only ``train`` is read.
        out_dir: the backbone's folder in the run directory.
        verbose: Keras ``fit`` verbosity.

    Returns:
        ``summary``: ``method``, ``epochs``, ``loss`` and ``z_std`` of the last epoch, ``tiles``,
        ``split``, ``weights`` (relative to the run directory), ``path`` (absolute),
        ``batch_size``, ``wall_seconds``, ``cpu_seconds``; ``trained_now``: false when a finished
        pretraining was found.

    Raises:
        ValueError: a multi-worker run, fewer than 2 training tiles, or ``out_dir/pretrain``
            holds a pretraining with other settings or tiles.
    """
    from lungtf.train.multiworker import worker_role

    if worker_role(run.train.distribution) is not None:
        raise ValueError("pretrain_epochs > 0 is not supported with several workers; pretrain "
                         "with python -m lungtf.pretrain and pass --weights NAME=FILE instead")
    rows = [r for records in splits.values() for r in records]
    records, note = split_records(rows, "train", str(out_dir.parent / "splits.csv"))
    if len(records) < 2:
        raise ValueError(f"pretraining needs at least 2 training tiles; got {len(records)}")
    out = out_dir / PRETRAIN_DIR
    _, weights, log_path = output_paths(entry, out)
    with _relayed(logging.getLogger("lungtf.pretrain"), log):
        trained = pretrain(entry, records, out, pretrain_settings(run, len(records)), note,
                           verbose) is not None
    logged = json.loads(log_path.read_text())
    last = logged["history"][-1]
    summary = {
        "method": "SimSiam", "epochs": last["epoch"], "loss": last["loss"],
        "z_std": last["z_std"], "tiles": logged["data"]["tiles"], "split": "train",
        "weights": str(weights.relative_to(out_dir.parent)), "path": str(weights),
        "batch_size": logged["batch_size"], "wall_seconds": logged["wall_seconds"],
        "cpu_seconds": logged["cpu_seconds"],
    }
    log.info(
        "%s: %s with SimSiam, %d epochs on the %d tiles of the training split only (validation "
        "and test not read): loss %.4f, z_std %.4f, %.0f CPU-s; fine-tuned from %s as a "
        "transfer backbone (head phase frozen, then all layers)", entry,
        "pretrained" if trained else "already pretrained (skipped)", summary["epochs"],
        summary["tiles"], summary["loss"], summary["z_std"], summary["cpu_seconds"],
        summary["weights"])
    return summary, trained
