"""``python -m lungtf.pretrain``: SimSiam pretraining of a backbone on unlabelled tiles.

Writes, per backbone entry (``regnet:200mf`` -> ``regnet-200mf``), into ``--out``:

- ``<entry>.weights.h5``: the backbone's weights (``backbone.save_weights``), the file
  ``python -m lungtf.train --weights PATH`` (or ``--weights regnet=PATH``) takes for the same
  backbone and variant; written to a temporary file and renamed, so an interrupted run never
  leaves half a file;
- ``<entry>.json``: the log: settings, which tiles were read (with ``--splits``, only the
  ``--split`` rows: the other splits never leak into pretraining), loss and ``z_std`` per epoch
  (the collapse monitor, ``lungtf.pretrain.simsiam.embedding_std``), wall and CPU time;
- ``<entry>/history.csv`` and ``<entry>/backup/``: the resumable state. Run the same command
  again after an interruption and training continues after the last finished epoch
  (``BackupAndRestore``); a finished entry is skipped; other settings in the same ``--out`` are
  refused.

Labels are never read (the class folders only locate the files).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import resource
import sys
import time
from collections import Counter
from pathlib import Path

from lungtf.config import INPUT_NORMS

log = logging.getLogger("lungtf.pretrain")

BASE_LR = 0.05
"""SimSiam's base learning rate; the peak is ``BASE_LR * batch_size / 256`` (SGD, momentum 0.9)."""

DEFAULTS = {"image_size": 128, "crop_size": 64, "epochs": 20, "batch_size": 64,
            "weight_decay": 1e-4, "dim": 512, "hidden": 128, "seed": 42}
"""SimSiam's settings when not given: the command line's defaults, and the settings
``python -m lungtf.train --pretrain-epochs N`` pretrains with (its own tile, view and epoch
counts and seed aside)."""


def make_settings(lr: float | None = None, input_norm: str = "default", **given) -> dict:
    """``pretrain``'s settings: ``DEFAULTS`` updated with the ``given`` ones that are not
    ``None``, the peak ``lr`` (default ``BASE_LR * batch_size / 256``), and ``input_norm``
    (``ModelConfig.input_norm``) when it is not ``default`` (so the settings of a default
    pretraining, and the resumable state they guard, stay as they were)."""
    s = {**DEFAULTS, **{k: v for k, v in given.items() if v is not None}}
    unknown = sorted(set(s) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown pretraining settings {unknown}; known: {sorted(DEFAULTS)}")
    norm = {} if input_norm == "default" else {"input_norm": input_norm}
    return {**s, "lr": lr if lr is not None else BASE_LR * s["batch_size"] / 256, **norm}


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags."""
    p = argparse.ArgumentParser(
        prog="python -m lungtf.pretrain",
        description="SimSiam self-supervised pretraining of lungtf backbones on unlabelled tiles; "
        "writes <out>/<backbone>.weights.h5 for python -m lungtf.train --weights PATH.",
    )
    p.add_argument("--data", help="class folders, LC25000 root or CSV manifest (all tiles read)")
    p.add_argument("--splits", help="split manifest: only its --split rows are read")
    p.add_argument("--split", default="train", help="the split read from --splits (default train)")
    p.add_argument("--backbones", default="regnet:200mf", help="comma list of name[:variant]")
    p.add_argument("--image-size", type=int, default=DEFAULTS["image_size"],
                   help="side tiles are cached at")
    p.add_argument("--crop-size", type=int, default=DEFAULTS["crop_size"],
                   help="side of each augmented view")
    p.add_argument("--epochs", type=int, default=DEFAULTS["epochs"])
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    p.add_argument("--lr", type=float, help=f"peak SGD learning rate (default {BASE_LR} x batch/256)")
    p.add_argument("--weight-decay", type=float, default=DEFAULTS["weight_decay"])
    p.add_argument("--dim", type=int, default=DEFAULTS["dim"], help="projection width")
    p.add_argument("--hidden", type=int, default=DEFAULTS["hidden"],
                   help="prediction MLP bottleneck width")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    p.add_argument("--input-norm", choices=INPUT_NORMS, default="default",
                   help="the backbone's input normalisation (lungtf.train --input-norm); a run "
                   "fine-tuning these weights must use the same (it refuses another)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--verbose", type=int, default=2, help="Keras fit verbosity (0, 1, 2)")
    return p


def select_records(data: str | None, splits: str | None, split: str) -> tuple[list, dict]:
    """The tiles to pretrain on, and a note saying where they came from.

    With ``splits`` only the rows of ``split`` are returned, so pretraining never sees a
    validation, test or CV-held-out source tile; without it, every tile of ``data``.

    Raises:
        ValueError: neither source given, or no rows in ``split``.
    """
    from lungtf.data.ingest import load_records
    from lungtf.data.split import read_manifest

    if splits:
        rows, protocol = read_manifest(splits)
        records, note = split_records(rows, split, str(splits), protocol)
        if data:
            note["note"] += "; --data was not read (--splits given)"
        return records, note
    if not data:
        raise ValueError("give --data DIR (every tile is read) or --splits splits.csv (its --split "
                         "rows only)")
    records = load_records(data)
    note = (f"all {len(records)} tiles of {data} (no --splits): evaluate a model fine-tuned from "
            f"these weights only on source tiles outside them")
    return records, {"source": str(data), "split": None, "tiles": len(records), "note": note}


def split_records(rows: list, split: str, source: str, protocol: str | None = None
                  ) -> tuple[list, dict]:
    """The ``rows`` of ``split`` and a note saying where they came from and that the other
    splits' rows were not read (so none of their tiles leaks into pretraining).

    Args:
        rows: split records (``Record.split`` set), e.g. a split manifest's.
        split: the split to keep.
        source: where ``rows`` came from, named in the note.
        protocol: the split protocol, when known.

    Raises:
        ValueError: no rows in ``split``.
    """
    records = [r for r in rows if r.split == split]
    others = dict(Counter(r.split for r in rows if r.split != split))
    if not records:
        raise ValueError(f"{source} has no rows in split {split!r}; splits found: "
                         f"{sorted({r.split for r in rows})}")
    groups = len({r.group for r in records})
    how = f", {protocol} protocol" if protocol else ""
    note = (f"only the {len(records)} tiles of split {split!r} of {source} ({groups} source "
            f"groups{how}); the other splits ({others}) were not read, so none of their tiles "
            f"leaks into pretraining")
    return records, {"source": source, "split": split, "protocol": protocol,
                     "tiles": len(records), "groups": groups, "note": note}


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _timer():
    import keras

    class EpochTimer(keras.callbacks.Callback):
        """Adds ``seconds`` and ``cpu_seconds`` of each epoch to its logs (and so the history)."""

        def on_epoch_begin(self, epoch, logs=None):
            self._start = (time.perf_counter(), cpu_seconds())

        def on_epoch_end(self, epoch, logs=None):
            if logs is not None:
                logs["seconds"] = time.perf_counter() - self._start[0]
                logs["cpu_seconds"] = cpu_seconds() - self._start[1]

    return EpochTimer()


def output_paths(entry: str, out: Path) -> tuple[Path, Path, Path]:
    """Where ``pretrain`` writes backbone ``entry`` in ``out``: its work folder (settings,
    history, backups), its weights file and its JSON log (``regnet:200mf`` ->
    ``regnet-200mf/``, ``regnet-200mf.weights.h5``, ``regnet-200mf.json``)."""
    from lungtf.models import get_spec
    from lungtf.train.fit import parse_entry

    name, variant = parse_entry(entry)
    stem = f"{name}-{get_spec(name).resolve_variant(variant)}"
    return out / stem, out / f"{stem}.weights.h5", out / f"{stem}.json"


def pretrain(entry: str, records: list, out: Path, settings: dict, data_note: dict,
             verbose: int = 2):
    """Pretrain backbone ``entry`` with SimSiam, save its weights and log; returns the model.

    Args:
        entry: ``name[:variant]``.
        records: the tiles (``select_records``).
        out: the output folder.
        settings: ``image_size``, ``crop_size``, ``epochs``, ``batch_size``, ``lr``,
            ``weight_decay``, ``dim``, ``hidden``, ``seed`` and optionally ``input_norm``
            (recorded in the log: ``lungtf.weight_sources.pretrained_input_norm``).
        data_note: what ``select_records`` says about the tiles, copied into the log.
        verbose: Keras ``fit`` verbosity.

    Returns:
        The trained ``SimSiam`` model, or ``None`` when ``entry`` was already finished.

    Raises:
        ValueError: ``out`` holds an unfinished pretraining of ``entry`` with other settings.
    """
    import keras
    import numpy as np
    import tensorflow as tf

    import lungtf
    from lungtf.config import ModelConfig
    from lungtf.models import build_model, get_spec
    from lungtf.pretrain.simsiam import SimSiam
    from lungtf.pretrain.views import make_views
    from lungtf.train.callbacks import PhaseBackup, ResumableCSVLogger, read_history
    from lungtf.train.fit import parse_entry
    from lungtf.train.rundir import atomic_path, write_text

    s = settings
    name, variant = parse_entry(entry)
    variant = get_spec(name).resolve_variant(variant)
    work, weights_path, log_path = output_paths(entry, out)
    tiles = hashlib.sha256("\n".join(sorted(r.path for r in records)).encode()).hexdigest()
    wanted = {"backbone": name, "variant": variant, **s, "tiles_sha256": tiles}
    settings_path = work / "settings.json"
    if settings_path.is_file() and json.loads(settings_path.read_text()) != wanted:
        raise ValueError(f"{work} holds a pretraining of {entry} with other settings or tiles; "
                         f"give another --out (or delete {work})")
    if log_path.is_file() and weights_path.is_file():
        log.info("%s: already pretrained with these settings (%s), skipped", entry, weights_path)
        return None
    work.mkdir(parents=True, exist_ok=True)
    write_text(settings_path, json.dumps(wanted))

    keras.utils.set_random_seed(s["seed"])
    classifier = build_model(ModelConfig(backbone=name, variant=variant, weights="none",
                                         image_size=s["image_size"],
                                         input_norm=s.get("input_norm", "default")))
    model = SimSiam(classifier.get_layer("preprocess"), classifier.get_layer("backbone"),
                    dim=s["dim"], hidden=s["hidden"], name=f"simsiam_{name}_{variant}")
    model(np.zeros((2, s["crop_size"], s["crop_size"], 3), np.float32))  # build the weights
    steps = len(records) // s["batch_size"]
    schedule = keras.optimizers.schedules.CosineDecay(s["lr"], s["epochs"] * steps)
    model.compile(optimizer=keras.optimizers.SGD(schedule, momentum=0.9,
                                                 weight_decay=s["weight_decay"]),
                  jit_compile=False)
    views = make_views(records, s["image_size"], s["crop_size"], s["batch_size"], seed=s["seed"])
    log.info("%s: SimSiam, %d epochs of %d steps (batch %d, %d px views of %d px tiles), peak lr "
             "%.3g; data: %s", entry, s["epochs"], steps, s["batch_size"], s["crop_size"],
             s["image_size"], s["lr"], data_note["note"])
    callbacks = [_timer(), ResumableCSVLogger(work / "history.csv"), PhaseBackup(work / "backup")]
    model.fit(views, epochs=s["epochs"], steps_per_epoch=steps, callbacks=callbacks,
              shuffle=False, verbose=verbose)  # the pipeline shuffles (seeded)

    with atomic_path(weights_path) as tmp:
        model.backbone.save_weights(tmp)
    history = [{"epoch": int(r["epoch"]) + 1, "loss": float(r["loss"]),
                "z_std": float(r["z_std"]), "seconds": round(float(r["seconds"]), 1),
                "cpu_seconds": round(float(r["cpu_seconds"]), 1)}
               for r in read_history(work / "history.csv")]
    record = {
        "method": "SimSiam (Chen & He 2021): symmetric negative cosine, stop-gradient, "
                  "projection + prediction MLPs; SGD momentum 0.9, cosine decay",
        "backbone": name, "variant": variant, "weights": weights_path.name,
        "load_with": f"python -m lungtf.train --backbones {name}:{variant} --weights "
                     f"{name}={weights_path}",
        "input_norm": "default", **s, "steps_per_epoch": steps, "data": data_note,
        "history": history,
        "z_std_collapsed": 0.0, "z_std_spread": round(1 / float(np.sqrt(s["dim"])), 4),
        "wall_seconds": round(sum(h["seconds"] for h in history), 1),
        "cpu_seconds": round(sum(h["cpu_seconds"] for h in history), 1),
        "versions": {"lungtf": lungtf.__version__, "tensorflow": tf.__version__,
                     "keras": keras.__version__},
    }
    write_text(log_path, json.dumps(record, indent=2))
    last = history[-1] if history else {}
    log.info("%s: loss %s, z_std %s (collapse 0, spread %.3f); weights %s", entry,
             last.get("loss"), last.get("z_std"), record["z_std_spread"], weights_path)
    return model


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and pretrain every backbone entry; returns 0 on success, 2 on bad input."""
    args = build_parser().parse_args(argv)
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    if args.epochs < 1 or args.batch_size < 2:
        log.error("--epochs must be >= 1 and --batch-size >= 2; got %d and %d", args.epochs,
                  args.batch_size)
        return 2
    try:
        records, note = select_records(args.data, args.splits, args.split)
        settings = make_settings(
            args.lr, image_size=args.image_size, crop_size=args.crop_size, epochs=args.epochs,
            batch_size=args.batch_size, weight_decay=args.weight_decay, dim=args.dim,
            hidden=args.hidden, seed=args.seed, input_norm=args.input_norm,
        )
        out = Path(args.out)
        for entry in (e.strip() for e in args.backbones.split(",") if e.strip()):
            pretrain(entry, records, out, settings, note, args.verbose)
    except (ValueError, FileNotFoundError) as err:
        log.error("%s", err)
        return 2
    return 0
