"""The ``weights`` setting: one source for every backbone, or one per backbone.

``--weights`` (``ModelConfig.weights``) is a comma list. An item ``NAME=SOURCE`` applies to the
backbones entry ``NAME`` (``regnet``, or ``regnet:400mf`` for that entry alone); one bare item
applies to every backbone not named; without one, those take ``imagenet``. A SOURCE is:

- ``imagenet``: the backbone's published ImageNet weights (fetched, or found in their cache);
- ``none``: random initialisation (trained from scratch);
- an existing file or directory: a backbone ``.weights.h5`` file, a keras.applications RegNetY
  ``_notop.h5`` file (``regnet``), a KerasHub preset directory (``resnet50d``,
  ``efficientnetv2_rw_t``);
- a remote KerasHub handle ``SCHEME://...`` (``hf://timm/efficientnetv2_rw_t.ra2_in1k``,
  ``kaggle://...``).

Example: ``--weights regnet=regnety016_notop.h5,resnet50d=presets/resnet50d,none``. Paths may
not contain ``,``. Which backbone takes which kind of source is the registry's business
(``lungtf.models.get_spec(name).weights_help``); this module only parses and checks the shape.
No TensorFlow import, so configurations validate fast.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

KEYWORDS: tuple[str, ...] = ("imagenet", "none")
_KEY = re.compile(r"^[a-z0-9_]+(:[a-z0-9_.]+)?$")
_HANDLE = re.compile(r"^[a-z][a-z0-9+.-]*://\S+$")


def parse(value: str) -> tuple[str | None, dict[str, str]]:
    """Split a ``weights`` setting into its bare default (or ``None``) and ``{entry: source}``.

    Raises:
        ValueError: an empty item, two bare items, a repeated name, or a source that is neither
            a keyword, an existing path nor a ``SCHEME://`` handle.
    """
    default, named = None, {}
    for item in (part.strip() for part in str(value).split(",")):
        if not item:
            raise ValueError(
                f"weights has an empty item (two commas, or one at an end); got {value!r}"
            )
        key, sep, source = item.partition("=")
        if sep and _KEY.match(key):
            if key in named:
                raise ValueError(f"weights names {key!r} twice; got {value!r}")
            named[key] = _check(source.strip(), value)
        elif default is not None:
            raise ValueError(
                f"weights may have one source without NAME= (for every other backbone); "
                f"got {default!r} and {item!r} in {value!r}"
            )
        else:
            default = _check(item, value)
    return default, named


def _check(source: str, value: str) -> str:
    if source in KEYWORDS or _HANDLE.match(source) or (source and Path(source).exists()):
        return source
    raise ValueError(
        f"weights must be imagenet, none, an existing file or directory, or a handle such as "
        f"hf://timm/NAME, optionally per backbone as NAME=SOURCE items of a comma list; "
        f"got {source!r} in {value!r}"
    )


def weights_for(value: str, entry: str) -> str:
    """The one source that backbones entry ``entry`` (``name`` or ``name:variant``) gets."""
    default, named = parse(value)
    name = entry.partition(":")[0]
    return named.get(entry) or named.get(name) or default or "imagenet"


def check_names(value: str, entries: tuple[str, ...]) -> None:
    """``ValueError`` when a ``NAME=`` item names no entry (or backbone name) of ``entries``."""
    _, named = parse(value)
    known = set(entries) | {entry.partition(":")[0] for entry in entries}
    unknown = sorted(set(named) - known)
    if unknown:
        raise ValueError(
            f"weights names {', '.join(unknown)}, which the run does not train; "
            f"backbones: {', '.join(entries)}"
        )


PRETRAIN_SUFFIX = ".weights.h5"
"""The suffix of the weights files ``python -m lungtf.pretrain`` writes (``<stem>.json`` beside)."""


def pretrained_input_norm(source: str) -> str | None:
    """The ``input_norm`` a ``python -m lungtf.pretrain`` weights file was pretrained with, read
    from its log beside it (``X.weights.h5`` -> ``X.json``; ``default`` when the log predates the
    setting); ``None`` when ``source`` is no such file (not a file, or no SimSiam log beside)."""
    if not source.endswith(PRETRAIN_SUFFIX):
        return None
    try:
        record = json.loads(Path(source[: -len(PRETRAIN_SUFFIX)] + ".json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not str(record.get("method", "")).startswith("SimSiam"):
        return None
    return str(record.get("input_norm", "default"))
