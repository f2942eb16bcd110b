"""Run configuration: frozen dataclasses, YAML defaults, CLI overrides, ``validate()`` first.

A run's configuration is resolved in this order: the dataclass defaults, then a preset
(``lungtf/configs/<preset>.yaml``), then a user YAML file, then CLI flags. The resolved
configuration is validated before anything runs and written as ``config.yaml`` into the run
directory, so every run can be reproduced from its own folder.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import yaml

from lungtf import weight_sources
from lungtf.constants import GROUPING_STRICTNESS, NUM_CLASSES

AUGMENTATIONS: tuple[str, ...] = (
    "flip_horizontal",
    "flip_vertical",
    "rotate",
    "hed_jitter",
    "hsv_jitter",
    "brightness",
    "contrast",
)
"""Augmentation names a config may list (see ``lungtf.data.augment.build_augmenter``)."""

DEFAULT_AUGMENT: tuple[str, ...] = ("flip_horizontal", "flip_vertical", "rotate")
"""The study's augmentation: horizontal and vertical flips, rotation up to 10 degrees."""


def _check_choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(str, allowed))}; got {value!r}")


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from and how they are split and fed.

    Attributes:
        data: a class-folder dataset, the LC25000 root, or a CSV manifest ``path,label[,group]``.
        splits: an existing split manifest (``path,label,group,split``); made when ``None``.
        groups: a ``path,label,group`` CSV of source-tile groups; detected when ``None``.
        ratios: train/val/test fractions of groups.
        seed: seed for splitting, shuffling and augmentation.
        image_size: side in pixels that every tile is squish-resized to.
        batch_size: images per batch (global batch under a distribution strategy).
        cache: cache decoded images in memory after the first epoch.
        augment: augmentation names applied to training batches, from ``AUGMENTATIONS``.
        rotation_degrees: the largest rotation of the ``rotate`` augmentation.
        rotation_probability: share of training tiles that ``rotate`` rotates (the others are
            only flipped); 0.75 is fastai's ``p_affine``, the study's setting.
        crop_size: train on random ``crop_size`` squares cut from the ``image_size`` tiles (with
            the flips and rotation); validation, test and serving use whole ``image_size`` tiles.
            0 trains on whole tiles. Crops of finer tiles show a network many views of each
            source tile at the training cost of the crop size.
        data_root: the folder every image must lie in (``lungtf.data.ingest.load_records``'s
            ``root``; ``--data-root``); default: the class root, or the manifest's folder.
        allow_outside_root: read images outside the data root (symlinks or manifest rows
            leading out; ``--allow-outside-root``).
        grouping_strictness: when groups are detected, how readily small groups are merged
            (``lungtf.data.grouping.STRICTNESS``; ``safe`` merges when unsure).
    """

    data: str | None = None
    splits: str | None = None
    groups: str | None = None
    ratios: tuple[float, float, float] = (0.7, 0.2, 0.1)
    seed: int = 42
    image_size: int = 224
    batch_size: int = 64
    cache: bool = False
    augment: tuple[str, ...] = DEFAULT_AUGMENT
    rotation_degrees: float = 10.0
    rotation_probability: float = 0.75
    crop_size: int = 0
    data_root: str | None = None
    allow_outside_root: bool = False
    grouping_strictness: str = "safe"

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field, what it got and what is allowed."""
        if len(self.ratios) != 3 or any(r < 0 for r in self.ratios):
            raise ValueError(f"ratios must be three non-negative numbers; got {self.ratios!r}")
        if abs(sum(self.ratios) - 1.0) > 1e-6 or self.ratios[0] == 0:
            raise ValueError(f"ratios must sum to 1 with a non-zero train part; got {self.ratios!r}")
        if not 16 <= self.image_size <= 1024:
            raise ValueError(f"image_size must be in 16..1024; got {self.image_size}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {self.batch_size}")
        for name in self.augment:
            _check_choice("augment", name, AUGMENTATIONS)
        _check_choice("grouping_strictness", self.grouping_strictness, GROUPING_STRICTNESS)
        if not 0 <= self.rotation_degrees <= 180:
            raise ValueError(f"rotation_degrees must be in 0..180; got {self.rotation_degrees}")
        if not 0 <= self.rotation_probability <= 1:
            raise ValueError(
                f"rotation_probability must be in 0..1; got {self.rotation_probability}"
            )
        if self.crop_size and not 16 <= self.crop_size <= self.image_size:
            raise ValueError(
                f"crop_size must be 0 (whole tiles) or in 16..image_size ({self.image_size}); "
                f"got {self.crop_size}"
            )


INPUT_NORMS: tuple[str, ...] = ("default", "unit", "imagenet")
"""``ModelConfig.input_norm`` choices: the backbone's own preprocessing, ``x / 255``, or torch-style
ImageNet mean/std (``lungtf.models.registry.INPUT_NORM_VALUES``)."""


@dataclass(frozen=True)
class ModelConfig:
    """Which backbone to build and how.

    Attributes:
        backbone: a name from ``lungtf.models.list_backbones()``.
        variant: a backbone-specific size (``b0``/``s`` for efficientnetv2, ``1.6gf`` for regnet);
            ``None`` takes the backbone's default.
        weights: ``imagenet``, ``none``, a local file/directory or a KerasHub handle, for every
            backbone or per backbone (``regnet=FILE,resnet50d=DIR``; ``lungtf.weight_sources``).
        image_size: input side in pixels; the model takes raw 0-255 RGB pixels of this size.
        num_classes: output units (softmax, float32 even under mixed precision).
        dropout: dropout rate before the classification layer.
        input_norm: the model's ``preprocess`` layer, from ``INPUT_NORMS``: ``default`` (the
            backbone's registry preprocessing, the one its pretrained weights expect), ``unit``
            (``x / 255``) or ``imagenet`` (``(x - ImageNet mean) / ImageNet std`` in 0-255 units).
            Other than ``default`` only where the weights loaded agree (``RunConfig.validate``).
    """

    backbone: str = "resnet50"
    variant: str | None = None
    weights: str = "imagenet"
    image_size: int = 224
    num_classes: int = NUM_CLASSES
    dropout: float = 0.2
    input_norm: str = "default"

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field, what it got and what is allowed."""
        if not 16 <= self.image_size <= 1024:
            raise ValueError(f"image_size must be in 16..1024; got {self.image_size}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2; got {self.num_classes}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1); got {self.dropout}")
        _check_choice("input_norm", self.input_norm, INPUT_NORMS)
        weight_sources.parse(self.weights)


PRECISIONS: tuple[str, ...] = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
"""``auto``: mixed_float16 when a GPU is visible, float32 otherwise."""

DISTRIBUTIONS: tuple[str, ...] = ("auto", "none", "mirrored", "multiworker")
"""``auto``: MultiWorkerMirrored when ``TF_CONFIG`` is set, Mirrored over 2+ GPUs, else none."""

SCHEDULES: tuple[str, ...] = ("cosine", "onecycle", "constant")
"""Learning-rate schedules of a training phase (warm-up then cosine decay, one-cycle, flat)."""

PRESETS: tuple[str, ...] = ("cpu", "cpu-224", "gpu")
"""Preset YAML files shipped in ``lungtf/configs/``."""

AUTO = "auto"


@dataclass(frozen=True)
class TrainConfig:
    """How each backbone is trained (the same for every backbone of one run).

    Transfer backbones train in two phases: ``head_epochs`` with the backbone frozen (BatchNorm
    in inference mode) at ``lr``, then ``epochs`` with everything trainable at
    ``lr * finetune_lr_factor``. From-scratch backbones (or ``weights: none``) train all layers
    for ``scratch_epochs`` at ``lr``.

    Attributes:
        head_epochs: phase-1 epochs (new head only); 0 skips phase 1.
        epochs: phase-2 epochs (all layers) of transfer backbones.
        scratch_epochs: epochs of backbones trained from scratch.
        lr: peak learning rate, or ``"auto"`` to take ``lr_find``'s suggestion.
        finetune_lr_factor: phase-2 peak LR as a fraction of ``lr``.
        schedule: one of ``SCHEDULES``.
        warmup_fraction: share of a phase's steps spent warming up (cosine) or rising (one-cycle).
        weight_decay: AdamW decoupled weight decay.
        label_smoothing: cross-entropy label smoothing in [0, 1).
        early_stopping_patience: epochs without val_accuracy gain before stopping; 0 disables.
        lr_find_steps: steps of the exponential LR sweep of ``lr_find``.
        precision: one of ``PRECISIONS``.
        jit_compile: ``"auto"`` (XLA with a GPU and a single replica), ``True`` or ``False``;
            with several replicas XLA stays off, with a warning (``runtime.resolve_jit``).
        distribution: one of ``DISTRIBUTIONS``.
        device_augment: ``"auto"`` (augment inside the training step when a GPU is visible),
            ``True`` or ``False`` (augment in the tf.data pipeline).
        ema_momentum: keep an exponential moving average of the trainable weights with this
            momentum per step (Keras's optimizer ``use_ema``), validate and checkpoint with the
            averaged weights, so ``best.keras`` and the exported model are averages; ``None``
            (default) trains without it. 0.99 averages over about the last 100 steps.
        backbone_process: train each backbone in a child process of its own
            (``lungtf.train.isolate``), so what it leaves in memory ends with it: ``"auto"``
            (when XLA is on and the run has several backbones: XLA's compilation cache is kept
            for the life of a process), ``True`` or ``False``; a multi-worker run trains in
            its own processes.
        pretrain_epochs: before a backbone trains, pretrain it for this many epochs with
            SimSiam (``lungtf.pretrain``, its default settings, views of ``data.crop_size``, else
            ``data.image_size``) on the run's training split only, then train it as a transfer
            backbone from those weights (``head_epochs`` frozen, then ``epochs`` at
            ``lr * finetune_lr_factor``); 0 (default) does not pretrain. Only for backbones with
            weights ``none``, and not with several workers.
    """

    head_epochs: int = 2
    epochs: int = 8
    scratch_epochs: int = 30
    lr: float | str = 1e-3
    finetune_lr_factor: float = 0.1
    schedule: str = "cosine"
    warmup_fraction: float = 0.1
    weight_decay: float = 1e-4
    label_smoothing: float = 0.0
    early_stopping_patience: int = 5
    lr_find_steps: int = 100
    precision: str = AUTO
    jit_compile: bool | str = AUTO
    distribution: str = AUTO
    device_augment: bool | str = AUTO
    ema_momentum: float | None = None
    backbone_process: bool | str = AUTO
    pretrain_epochs: int = 0

    def __post_init__(self) -> None:
        # YAML 1.1 reads ``1e-3`` (no dot) as a string: accept any number written as text.
        if isinstance(self.lr, str) and self.lr != AUTO:
            try:
                object.__setattr__(self, "lr", float(self.lr))
            except ValueError:
                pass  # validate() reports it with the allowed values

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field, what it got and what is allowed."""
        for name in ("head_epochs", "epochs", "scratch_epochs", "early_stopping_patience",
                     "pretrain_epochs"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0; got {value!r}")
        if self.epochs + self.head_epochs < 1 or self.scratch_epochs < 1:
            raise ValueError(
                "a run needs at least one epoch: head_epochs + epochs >= 1 and scratch_epochs >= 1;"
                f" got {self.head_epochs} + {self.epochs} and {self.scratch_epochs}"
            )
        if self.lr != AUTO and not (isinstance(self.lr, (int, float)) and 0 < self.lr <= 10):
            raise ValueError(f"lr must be a number in (0, 10] or 'auto'; got {self.lr!r}")
        if not 0 < self.finetune_lr_factor <= 1:
            raise ValueError(
                f"finetune_lr_factor must be in (0, 1]; got {self.finetune_lr_factor}"
            )
        _check_choice("schedule", self.schedule, SCHEDULES)
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"warmup_fraction must be in [0, 1); got {self.warmup_fraction}")
        if not 0 <= self.weight_decay < 1:
            raise ValueError(f"weight_decay must be in [0, 1); got {self.weight_decay}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1); got {self.label_smoothing}")
        if not isinstance(self.lr_find_steps, int) or self.lr_find_steps < 10:
            raise ValueError(f"lr_find_steps must be an integer >= 10; got {self.lr_find_steps!r}")
        _check_choice("precision", self.precision, PRECISIONS)
        _check_choice("jit_compile", self.jit_compile, (AUTO, True, False))
        _check_choice("distribution", self.distribution, DISTRIBUTIONS)
        _check_choice("device_augment", self.device_augment, (AUTO, True, False))
        _check_choice("backbone_process", self.backbone_process, (AUTO, True, False))
        if self.ema_momentum is not None and not (
            isinstance(self.ema_momentum, (int, float)) and not isinstance(self.ema_momentum, bool)
            and 0 < self.ema_momentum < 1
        ):
            raise ValueError(
                f"ema_momentum must be a number in (0, 1) or null (no EMA); got {self.ema_momentum!r}"
            )


@dataclass(frozen=True)
class RunConfig:
    """Everything one ``python -m lungtf.train`` run needs; written as the run's ``config.yaml``.

    Attributes:
        data: input, split and pipeline settings.
        model: model settings shared by every backbone (``backbone``/``variant`` are overridden
            per entry of ``backbones``).
        train: the training recipe, the same for every backbone.
        backbones: entries ``name`` or ``name:variant`` (e.g. ``regnet:400mf``), trained in order
            on the same split, transforms, batch size and schedule.
        name: the run's name; the run directory is ``<output>/<UTC timestamp>-<name>``.
        output: folder that holds run directories.
        preset: the preset YAML the run started from (``cpu``/``gpu``), recorded for the reader.
    """

    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    backbones: tuple[str, ...] = (
        "resnet50", "resnet50d", "efficientnetv2_rw_t", "regnet", "resnet34",
    )  # fmt: skip
    name: str = "train"
    output: str = "runs"
    preset: str | None = None

    def validate(self) -> None:
        """Validate every section, then the run-level fields; ``ValueError`` says what is wrong.

        Backbone names are checked against ``lungtf.models.list_backbones()``, and the kind of
        every backbone's weights source against what that backbone loads
        (``lungtf.models.check_weights_source``; imported here, so validation happens before any
        data is read or any model is built).
        """
        self.data.validate()
        self.model.validate()
        self.train.validate()
        if self.data.image_size != self.model.image_size:
            raise ValueError(
                f"data.image_size ({self.data.image_size}) and model.image_size "
                f"({self.model.image_size}) must be equal; set both or use --image-size"
            )
        if not self.backbones:
            raise ValueError("backbones must name at least one backbone; got none")
        if len(set(self.backbones)) != len(self.backbones):
            raise ValueError(f"backbones must not repeat; got {list(self.backbones)}")
        from lungtf.models import check_input_norm, check_weights_source, list_backbones

        known = list_backbones()
        for entry in self.backbones:
            if entry.split(":")[0] not in known:
                raise ValueError(
                    f"unknown backbone {entry!r} in backbones; known: {', '.join(known)}"
                )
        weight_sources.check_names(self.model.weights, self.backbones)
        for entry in self.backbones:  # every source's kind, before the first backbone trains
            source = weight_sources.weights_for(self.model.weights, entry)
            try:
                check_weights_source(entry.split(":")[0], source)
                check_input_norm(entry.split(":")[0], source, self.model.input_norm)
            except ValueError as err:
                raise ValueError(f"weights of backbones entry {entry!r}: {err}") from None
        if self.train.pretrain_epochs:
            self._check_pretraining()
        if not self.name or any(c in self.name for c in "/\\ "):
            raise ValueError(
                f"name must be non-empty without '/', '\\' or spaces; got {self.name!r}"
            )
        if self.preset is not None:
            _check_choice("preset", self.preset, PRESETS)

    def _check_pretraining(self) -> None:
        """``train.pretrain_epochs`` > 0: every backbone starts from weights ``none`` and one
        process trains (a multi-worker run would pretrain on every worker apart)."""
        given = {e: weight_sources.weights_for(self.model.weights, e) for e in self.backbones}
        others = {e: w for e, w in given.items() if w != "none"}
        if others:
            listed = ", ".join(f"{e}: {w}" for e, w in others.items())
            raise ValueError(
                f"pretrain_epochs ({self.train.pretrain_epochs}) pretrains backbones that start "
                f"from scratch, so every backbone needs weights none; got {listed} (give "
                f"--weights none, or pretrain_epochs 0 to fine-tune those weights)"
            )
        if self.train.distribution == "multiworker":
            raise ValueError("pretrain_epochs > 0 is not supported with distribution "
                             "multiworker; pretrain with python -m lungtf.pretrain and pass "
                             "--weights NAME=FILE instead")


PRESET_DIR = Path(__file__).resolve().parent / "configs"
"""Where the preset YAML files live (package data)."""


def _mirror_image_size(layer: dict[str, Any]) -> dict[str, Any]:
    """Copy ``image_size`` between the ``data`` and ``model`` sections when a layer sets only one.

    The pipeline's resize and the model's input must agree, so a YAML file that sets the size in
    one section sets it for both.
    """
    layer = {k: dict(v) if isinstance(v, dict) else v for k, v in layer.items()}
    data, model = layer.get("data") or {}, layer.get("model") or {}
    if "image_size" in data and "image_size" not in model:
        layer["model"] = {**model, "image_size": data["image_size"]}
    elif "image_size" in model and "image_size" not in data:
        layer["data"] = {**data, "image_size": model["image_size"]}
    return layer


def resolve_run_config(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> RunConfig:
    """Resolve a ``RunConfig``: defaults, then the preset, then ``config_file``, then overrides.

    Args:
        preset: ``cpu`` or ``gpu`` (``lungtf/configs/<preset>.yaml``), or ``None``.
        config_file: a user YAML file with the same nested layout as ``config.yaml``.
        overrides: a nested mapping (e.g. from CLI flags), applied last.

    Returns:
        The resolved configuration; not yet validated (call ``validate()``).

    Raises:
        ValueError: unknown preset, or an unknown key in any layer.
    """
    cfg = RunConfig()
    layers: list[dict[str, Any]] = []
    if preset is not None:
        _check_choice("preset", preset, PRESETS)
        layers.append({**load_yaml(PRESET_DIR / f"{preset}.yaml"), "preset": preset})
    if config_file is not None:
        layers.append(load_yaml(config_file))
    if overrides:
        layers.append(overrides)
    for layer in layers:
        cfg = from_dict(RunConfig, _mirror_image_size(layer), cfg)
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain ``dict`` (tuples as lists) of a config dataclass, ready for YAML."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in fields(v)}
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        return v

    return plain(cfg)


def from_dict(cls: type, values: dict[str, Any], base: Any | None = None) -> Any:
    """Build (or update ``base`` of) dataclass ``cls`` from a mapping, nested dataclasses included.

    Unknown keys raise ``ValueError`` listing the known ones, so a typo in a YAML file is an
    error rather than a silently ignored setting.
    """
    base = base if base is not None else cls()
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(
            f"unknown {cls.__name__} keys {unknown}; known keys are {', '.join(sorted(known))}"
        )
    changes: dict[str, Any] = {}
    for key, value in values.items():
        current = getattr(base, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            changes[key] = from_dict(type(current), value, current)
        elif isinstance(current, tuple) and isinstance(value, (list, tuple)):
            changes[key] = tuple(value)
        else:
            changes[key] = value
    return replace(base, **changes)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; an empty file is an empty mapping."""
    with open(path, encoding="utf-8") as fh:
        loaded = yaml.safe_load(fh) or {}
    if not isinstance(loaded, dict):
        # a bad file is a bad value of --config, reported like every other config error
        raise ValueError(f"{path} must hold a YAML mapping; got {type(loaded).__name__}")  # noqa: TRY004
    return loaded


def same_config(path: str | Path, cfg: Any) -> bool:
    """Whether the ``config.yaml`` at ``path`` resolves to ``cfg`` (a run directory's resolved
    configuration); keys it lacks, e.g. ones added since, take their defaults, and a key the code
    no longer knows means another configuration."""
    try:
        return from_dict(type(cfg), load_yaml(path)) == cfg
    except ValueError:
        return False


def dump_yaml(cfg: Any, path: str | Path) -> None:
    """Write a config dataclass as YAML (the resolved ``config.yaml`` of a run)."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")


__all__ = [
    "AUGMENTATIONS",
    "DEFAULT_AUGMENT",
    "DISTRIBUTIONS",
    "INPUT_NORMS",
    "PRECISIONS",
    "PRESETS",
    "SCHEDULES",
    "DataConfig",
    "ModelConfig",
    "RunConfig",
    "TrainConfig",
    "dump_yaml",
    "from_dict",
    "load_yaml",
    "resolve_run_config",
    "same_config",
    "to_dict",
]
