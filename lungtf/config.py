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

from lungtf.constants import NUM_CLASSES

AUGMENTATIONS: tuple[str, ...] = (
    "flip_horizontal",
    "flip_vertical",
    "rotate",
    "hed_jitter",
    "hsv_jitter",
    "brightness",
    "contrast",
)
"""Augmentation names a config may list (see ``lungtf.data.pipeline.build_augmenter``)."""

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
        if not 0 <= self.rotation_degrees <= 180:
            raise ValueError(f"rotation_degrees must be in 0..180; got {self.rotation_degrees}")


@dataclass(frozen=True)
class ModelConfig:
    """Which backbone to build and how.

    Attributes:
        backbone: a name from ``lungtf.models.list_backbones()``.
        variant: a backbone-specific size (``b0``/``s`` for efficientnetv2, ``1.6gf`` for regnet);
            ``None`` takes the backbone's default.
        weights: ``imagenet``, ``none``, or a path to a backbone weights file.
        image_size: input side in pixels; the model takes raw 0-255 RGB pixels of this size.
        num_classes: output units (softmax, float32 even under mixed precision).
        dropout: dropout rate before the classification layer.
    """

    backbone: str = "resnet50"
    variant: str | None = None
    weights: str = "imagenet"
    image_size: int = 224
    num_classes: int = NUM_CLASSES
    dropout: float = 0.2

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field, what it got and what is allowed."""
        if not 16 <= self.image_size <= 1024:
            raise ValueError(f"image_size must be in 16..1024; got {self.image_size}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2; got {self.num_classes}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1); got {self.dropout}")
        if self.weights not in ("imagenet", "none") and not Path(self.weights).is_file():
            raise ValueError(
                f"weights must be 'imagenet', 'none' or an existing weights file; got {self.weights!r}"
            )


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
        raise ValueError(f"{path} must hold a YAML mapping; got {type(loaded).__name__}")
    return loaded


def dump_yaml(cfg: Any, path: str | Path) -> None:
    """Write a config dataclass as YAML (the resolved ``config.yaml`` of a run)."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")


__all__ = [
    "AUGMENTATIONS",
    "DEFAULT_AUGMENT",
    "DataConfig",
    "ModelConfig",
    "dump_yaml",
    "from_dict",
    "load_yaml",
    "to_dict",
]
