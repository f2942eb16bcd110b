"""Train one backbone with the study's recipe, resumably, and measure it on the validation split.

Transfer backbones (pretrained weights) train in two phases: ``head`` with the backbone frozen
(BatchNorm in inference mode) and ``finetune`` with everything trainable at a lower peak LR.
Backbones without pretrained weights (``spec.from_scratch`` or ``weights: none``) train all
layers from the start in one ``scratch`` phase of ``scratch_epochs``, unless
``train.pretrain_epochs`` pretrains them first (``lungtf.train.pretraining``): they then train as
transfer backbones from their pretrained weights. Every phase uses AdamW with
a warm-up + cosine (or one-cycle) schedule and cross-entropy with optional label smoothing.

Resume: ``<out>/state.json`` records the LR and the epoch each finished phase ended at; each phase
keeps its own ``BackupAndRestore`` backup, so a restart replays finished phases as zero-epoch
``fit`` calls (restoring their final weights) and continues the unfinished one mid-way.
"""

from __future__ import annotations

import json
import logging
import math
import time
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import keras
import tensorflow as tf

from lungtf.config import AUTO, RunConfig
from lungtf.constants import NUM_CLASSES
from lungtf.data.augment import build_augmenter
from lungtf.data.pipeline import length_found_at_end, make_dataset
from lungtf.heap import trim_heap
from lungtf.models import (
    BackboneSpec,
    build_model,
    freeze_backbone,
    get_spec,
    training_view,
    unfreeze_backbone,
)
from lungtf.train.callbacks import Throughput, make_callbacks, plot_curves, read_history
from lungtf.train.compare import evaluate_records
from lungtf.train.lr_find import lr_find
from lungtf.train.multiworker import bytes_from_chief, check_in_sync, mirror_from_chief
from lungtf.train.pretraining import pretrain_in_run
from lungtf.train.runtime import Runtime
from lungtf.weight_sources import weights_for

log = logging.getLogger("lungtf.train")


@dataclass(frozen=True)
class Phase:
    """One ``fit`` call of the recipe: name, epochs, peak LR, whether the backbone is frozen."""

    name: str
    epochs: int
    peak_lr: float
    frozen: bool


def parse_entry(entry: str) -> tuple[str, str | None]:
    """Split a ``backbones`` entry ``name[:variant]`` into name and variant."""
    name, _, variant = entry.partition(":")
    return name, variant or None


def entry_dir(run_dir: Path, entry: str) -> Path:
    """The folder of backbone ``entry`` in a run directory (``regnet:400mf``: ``regnet-400mf``)."""
    return run_dir / entry.replace(":", "-")


def resolve_weights(spec: BackboneSpec, requested: str, entry: str) -> tuple[str, str | None]:
    """The weights backbone ``spec`` can start from, and why it differs from ``requested``.

    A backbone whose registry spec has no ImageNet weights (``spec.imagenet`` false:
    ``resnet34`` today) trains from scratch when ``imagenet`` is asked for; the run goes on
    (a study comparison should not stop for one of them) but says so: the note is
    logged at WARNING level and written into ``comparison.md``.

    Args:
        spec: the backbone's registry spec.
        requested: ``ModelConfig.weights`` of the run.
        entry: the ``backbones`` entry, named in the warning.

    Returns:
        ``(weights, note)``; ``note`` is ``None`` when the request is honoured.
    """
    if requested == "imagenet" and not spec.imagenet:
        note = (
            f"weights imagenet requested, but {spec.name} has no ImageNet weights "
            f"({spec.description}): trained FROM SCRATCH (weights none) instead"
        )
        log.warning("%s: %s", entry, note)
        return "none", note
    return requested, None


def plan_phases(run: RunConfig, transfer: bool, lr: float) -> list[Phase]:
    """The phases of the recipe for a transfer (two phases) or from-scratch (one) backbone."""
    t = run.train
    if not transfer:
        return [Phase("scratch", t.scratch_epochs, lr, frozen=False)]
    phases = [
        Phase("head", t.head_epochs, lr, frozen=True),
        Phase("finetune", t.epochs, lr * t.finetune_lr_factor, frozen=False),
    ]
    return [p for p in phases if p.epochs > 0]


@keras.saving.register_keras_serializable(package="lungtf")
class OneCycle(keras.optimizers.schedules.LearningRateSchedule):
    """One-cycle LR: cosine rise from ``peak/25`` over ``warmup_steps``, then cosine decay to
    ``peak/1e4`` at ``total_steps`` (fastai's ``fit_one_cycle`` shape)."""

    def __init__(self, peak: float, total_steps: int, warmup_steps: int):
        self.peak, self.total_steps, self.warmup_steps = peak, total_steps, warmup_steps

    def __call__(self, step):
        step = keras.ops.cast(step, "float32")
        warm = max(self.warmup_steps, 1)
        rise = keras.ops.minimum(step / warm, 1.0)
        fall = keras.ops.clip((step - warm) / max(self.total_steps - warm, 1), 0.0, 1.0)
        start, end = self.peak / 25, self.peak / 1e4
        up = start + (self.peak - start) * (1 - keras.ops.cos(math.pi * rise)) / 2
        down = end + (self.peak - end) * (1 + keras.ops.cos(math.pi * fall)) / 2
        return keras.ops.where(step < warm, up, down)

    def get_config(self):
        return {
            "peak": self.peak,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
        }


def make_schedule(kind: str, peak: float, total_steps: int, warmup_fraction: float):
    """The LR of a phase: ``cosine`` (linear warm-up, cosine decay), ``onecycle``, ``constant``."""
    warmup = int(total_steps * warmup_fraction)
    if kind == "constant":
        return peak
    if kind == "onecycle":
        return OneCycle(peak, total_steps, warmup)
    if warmup == 0:
        return keras.optimizers.schedules.CosineDecay(peak, max(total_steps, 1))
    return keras.optimizers.schedules.CosineDecay(
        peak / 100, max(total_steps - warmup, 1), warmup_target=peak, warmup_steps=warmup
    )


def compile_model(
    model: keras.Model, lr, run: RunConfig, rt: Runtime, ema: float | None = None
) -> None:
    """AdamW + cross-entropy on one-hot labels (so label smoothing applies) + accuracy; with
    ``ema`` (a momentum), the optimizer keeps a moving average of the weights (``SwapEMA``)."""
    ema_options = {"use_ema": True, "ema_momentum": ema} if ema is not None else {}
    model.compile(
        optimizer=keras.optimizers.AdamW(
            learning_rate=lr, weight_decay=run.train.weight_decay, **ema_options
        ),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=run.train.label_smoothing),
        metrics=["accuracy"],
        jit_compile=rt.jit_compile,
    )
    # Built now, not in the first traced train step: there its variables' creation makes
    # TensorFlow trace the step a second time, in every phase (~20 % of a tiny run's CPU).
    model.optimizer.build(model.trainable_variables)


def _one_hot(ds: tf.data.Dataset) -> tf.data.Dataset:
    return ds.map(lambda x, y: (x, tf.one_hot(y, NUM_CLASSES)), num_parallel_calls=tf.data.AUTOTUNE)


def _set_trainable(model: keras.Model, phase: Phase, finetune_batchnorm: bool) -> None:
    """Freeze for ``head``; unfreeze otherwise (BatchNorm trains from scratch, or per the spec)."""
    if phase.frozen:
        freeze_backbone(model)
    else:
        unfreeze_backbone(model, train_batchnorm=phase.name == "scratch" or finetune_batchnorm)


def _load_state(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {"phases": {}, "seconds": 0.0}


def _save_state(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(path)


def release_backbone(precision: str) -> None:
    """Free what a finished backbone left behind, before the next backbone is built.

    ``train_backbone`` keeps nothing once it returns (model, training view, optimizer, compiled
    train/eval functions, callbacks and datasets are its locals), but three things outlive it:

    - every trace of Keras's train step passes the gradients through
      ``ReplicaContext.all_reduce`` (default strategy included), a ``tf.custom_gradient``, and
      TensorFlow registers each graph-mode custom gradient under a new ``CustomGradient-<uid>``
      name in its process-wide gradient registry and never removes it (tensorflow#97697, in
      TF 2.21). The registered closure holds the step's gradient tensors, hence its whole
      ``FuncGraph``, the variable-initialisation ``cond`` functions traced with it and their
      FunctionDefs in the eager context: ~0.3 GiB a backbone at 32 px, never freed. These
      entries are dropped (``_drop_custom_gradients``): after a backbone nothing traced before
      is differentiated again;
    - Keras models live in reference cycles that Python frees only at a full collection;
      ``keras.utils.clear_session(free_memory=True)`` collects them now and resets Keras's
      global state, TensorFlow's default graph and kernel cache (and the global dtype policy,
      so the run's ``precision`` is set again);
    - glibc keeps freed heap pages; ``malloc_trim(0)`` hands them back where glibc is the C
      library (a no-op elsewhere). Device memory stays in TensorFlow's allocator pool, reused
      by the next backbone.
    """
    _drop_custom_gradients()
    keras.utils.clear_session(free_memory=True)
    trim_heap()
    keras.config.set_dtype_policy(precision)


def _drop_custom_gradients() -> int:
    """Unregister every graph-mode ``tf.custom_gradient`` (``CustomGradient-<uid>``) traced so
    far; returns how many. TensorFlow has no public call for it: its registry is private."""
    from tensorflow.python.framework import ops

    registry = getattr(getattr(ops, "_gradient_registry", None), "_registry", None)
    if not isinstance(registry, dict):  # a TensorFlow that stores it differently: nothing to do
        return 0
    names = [name for name in registry if name.startswith("CustomGradient-")]
    for name in names:
        del registry[name]
    return len(names)


def backbone_seed(seed: int, entry: str) -> int:
    """The Keras random seed of backbone ``entry`` in a run seeded ``seed`` (stable across
    processes: not Python's salted ``hash``)."""
    return (seed + zlib.crc32(entry.encode())) % 2**31


def train_backbone(
    entry: str,
    run: RunConfig,
    rt: Runtime,
    splits: dict[str, list],
    out_dir: Path,
    verbose: int = 2,
    extra_callbacks: list | None = None,
) -> dict:
    """Train backbone ``entry`` (``name[:variant]``) into ``out_dir`` and return its result row.

    Args:
        entry: a ``RunConfig.backbones`` entry.
        run: the resolved run configuration.
        rt: the runtime from ``lungtf.train.runtime.runtime``.
        splits: ``train``/``val``/``test`` record lists (the same for every backbone).
        out_dir: the backbone's folder in the run directory (history, backups, checkpoint, plots).
        verbose: Keras ``fit`` verbosity.
        extra_callbacks: more callbacks for every phase, after the built-in ones.

    Returns:
        ``entry``, ``backbone``, ``variant``, ``weights`` (the ones used), ``weights_requested``,
        ``weights_note`` (why they differ, else ``None``), ``lr``, ``epochs``, ``val_accuracy``,
        ``val_loss``, ``missed_cancers``, ``benign_called_cancer``, ``val_n``, ``params``,
        ``wall_time_s``, ``train_img_per_s`` (also written to ``out_dir/result.json``, which marks it done).
        A non-chief worker of a multi-worker run returns ``{}`` after training (the chief
        evaluates); its ``out_dir`` holds the chief's state files (``multiworker.CHIEF_STATE``).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    mirror_from_chief(rt.strategy, out_dir)  # non-chief workers follow the chief's state
    if (out_dir / "result.json").is_file():
        log.info("%s: already trained (result.json), skipped", entry)
        return json.loads((out_dir / "result.json").read_text())
    state_path = out_dir / "state.json"
    state = _load_state(state_path)
    name, variant = parse_entry(entry)
    spec = get_spec(name)
    weights, weights_note = resolve_weights(spec, weights_for(run.model.weights, entry), entry)
    pretrained = None
    if run.train.pretrain_epochs:  # then fine-tuned from these weights, as a transfer source
        pretrained, trained_now = pretrain_in_run(entry, run, splits, out_dir, verbose)
        if trained_now:
            release_backbone(rt.precision)  # SimSiam's traced steps, before the classifier
        weights = pretrained["path"]
    mcfg = replace(run.model, backbone=name, variant=variant, weights=weights)
    d = run.data
    augmenter = build_augmenter(
        d.augment, d.rotation_degrees, d.rotation_probability, d.seed, d.crop_size
    )
    train_ds = _one_hot(
        make_dataset(
            splits["train"],
            d.image_size,
            d.batch_size,
            training=True,
            augmenter=None if rt.device_augment else augmenter,
            seed=d.seed,
            cache=d.cache,
        )
    )
    val_ds = _one_hot(
        make_dataset(splits["val"], d.image_size, d.batch_size, training=False, cache=d.cache)
    )
    if rt.replicas > 1:
        # Keras 3 fails on a batch that does not split evenly over the replicas (AddN shape error,
        # keras-team/keras#19246): such a last batch is left out of fit's epochs. The reported
        # validation metrics are computed afterwards on every image, outside the strategy.
        train_ds, val_ds = (
            ds.filter(lambda x, y: tf.shape(x)[0] % rt.replicas == 0) for ds in (train_ds, val_ds)
        )
    # One training iterator for the whole phase (repeat + steps_per_epoch), not one per epoch:
    # destroying a tf.data iterator waits for its autotuning thread, which wakes only on its own
    # timer (stalls of about 35 s at half the epoch ends were measured here on 2 cores).
    batches = math.ceil if rt.replicas == 1 else math.floor  # uneven last batches are filtered
    steps_per_epoch = max(1, batches(len(splits["train"]) / d.batch_size))
    train_ds = train_ds.repeat()
    # Initial weights (and Keras's unseeded random layers) follow the run's seed, one stream per
    # backbone entry: the same --seed builds the same starting model, a resumed run included.
    keras.utils.set_random_seed(backbone_seed(d.seed, entry))
    with rt.strategy.scope():
        model = build_model(mcfg)
        fitted = training_view(model, augmenter if rt.device_augment else None)

    lr = state.get("lr", run.train.lr)
    if lr == AUTO:
        first = plan_phases(run, weights != "none", 1.0)[0]
        _set_trainable(model, first, spec.finetune_batchnorm)
        with rt.strategy.scope():
            compile_model(fitted, 1e-7, run, rt)
        found = lr_find(
            fitted, train_ds, steps=run.train.lr_find_steps, png=out_dir / "lr_find.png"
        )
        lr = float(bytes_from_chief(rt.strategy, repr(float(found.suggestion)).encode()))
        log.info("%s: lr_find suggests %.2e (plot: %s)", entry, lr, out_dir / "lr_find.png")
    state["lr"] = lr
    _save_state(state_path, state)

    epoch, timed = 0, []
    for phase in plan_phases(run, weights != "none", lr):
        _set_trainable(model, phase, spec.finetune_batchnorm)
        with rt.strategy.scope():
            compile_model(
                fitted,
                make_schedule(
                    run.train.schedule,
                    phase.peak_lr,
                    phase.epochs * steps_per_epoch,
                    run.train.warmup_fraction,
                ),
                run,
                rt,
                ema=run.train.ema_momentum,
            )
        finished = state["phases"].get(phase.name)
        callbacks = make_callbacks(
            out_dir, phase.name, model, len(splits["train"]), run.train.early_stopping_patience,
            ema=run.train.ema_momentum is not None,
        ) + list(extra_callbacks or [])
        log.info(
            "%s: phase %s, epochs %d..%d, peak lr %.2e%s",
            entry,
            phase.name,
            epoch + 1,
            epoch + phase.epochs,
            phase.peak_lr,
            " (restored)" if finished else "",
        )
        start = time.perf_counter()
        with length_found_at_end():
            fitted.fit(
                train_ds,
                steps_per_epoch=steps_per_epoch,
                shuffle=False,  # the pipeline shuffles (seeded); Keras cannot shuffle tf.data
                validation_data=val_ds,
                epochs=finished or epoch + phase.epochs,
                initial_epoch=epoch,
                callbacks=callbacks,
                verbose=verbose,
            )
        rows = read_history(out_dir / "history.csv")
        epoch = finished or (int(rows[-1]["epoch"]) + 1 if rows else epoch)
        if not finished:
            state["phases"][phase.name] = epoch
            state["seconds"] += time.perf_counter() - start
            timed += [c for c in callbacks if isinstance(c, Throughput)]
            _save_state(state_path, state)

    check_in_sync(rt.strategy, model, entry)
    if not rt.chief:
        return {}
    best = keras.models.load_model(out_dir / "best.keras", compile=False)
    val = evaluate_records(best, splits["val"], d.image_size, d.batch_size)
    seconds = sum(sum(t.epoch_seconds[1:] or t.epoch_seconds) for t in timed)
    images = sum(t.images_per_epoch * len(t.epoch_seconds[1:] or t.epoch_seconds) for t in timed)
    result = {
        "entry": entry,
        "backbone": name,
        "variant": spec.resolve_variant(variant),
        "weights": pretrained["weights"] if pretrained else weights,
        "weights_requested": run.model.weights,
        "weights_note": weights_note,
        "pretrained": pretrained,
        "lr": lr,
        "epochs": epoch,
        "val_accuracy": val["accuracy"],
        "val_loss": val["loss"],
        "missed_cancers": val["missed_cancers"],
        "benign_called_cancer": val["benign_called_cancer"],
        "val_n": val["n"],
        "params": best.count_params(),
        "wall_time_s": round(state["seconds"], 1),
        "train_img_per_s": round(images / seconds, 1) if seconds else None,
    }
    plot_curves(out_dir / "history.csv", out_dir / "curves.png", entry)
    _save_state(out_dir / "result.json", result)
    log.info(
        "%s: val accuracy %.4f, missed cancers %d", entry, val["accuracy"], val["missed_cancers"]
    )
    return result
