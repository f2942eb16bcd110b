"""Class names and the cancer/benign mapping: the one source every other module imports.

The order of ``CLASS_NAMES`` is the order of the model's output units, of the probability columns
in every CSV this project writes, and of the ``class_name`` output of the exported SavedModel.
"""

CLASS_NAMES: tuple[str, ...] = ("lung_aca", "lung_n", "lung_scc")
"""LC25000 lung folder names, in model output order."""

CLASS_DESCRIPTIONS: dict[str, str] = {
    "lung_aca": "adenocarcinoma",
    "lung_n": "benign tissue",
    "lung_scc": "squamous cell carcinoma",
}
"""Words a person reads for each class (demo, reports)."""

CANCER_CLASSES: frozenset[str] = frozenset({"lung_aca", "lung_scc"})
"""Classes that are cancer; a cancer tile predicted as a benign class is a *missed cancer*."""

BENIGN_CLASSES: frozenset[str] = frozenset({"lung_n"})
"""Classes that are benign tissue."""

NUM_CLASSES: int = len(CLASS_NAMES)

BUSY_MESSAGE = "the server is busy"
"""How the dev server's RESOURCE_EXHAUSTED refusals for load begin (``lungtf.serving.admission``);
``lungtf.client`` retries those, and no other RESOURCE_EXHAUSTED."""

SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")
"""Split names used in manifests, in ratio order."""

PROTOCOL_GROUPED = "grouped"
PROTOCOL_RANDOM = "random (leaky)"
SPLIT_PROTOCOLS: tuple[str, ...] = (PROTOCOL_GROUPED, PROTOCOL_RANDOM)

GROUPING_STRICTNESS: tuple[str, ...] = ("safe", "balanced", "strict")
"""How readily automatic grouping merges when unsure (``lungtf.data.grouping.STRICTNESS``);
the first, merging when unsure, is the default."""
"""How a split was made. Every manifest and report says which one; only ``grouped`` is leak-free."""


def class_index(name: str) -> int:
    """Return the output index of a class name.

    Raises:
        ValueError: if ``name`` is not one of ``CLASS_NAMES``.
    """
    try:
        return CLASS_NAMES.index(name)
    except ValueError:
        raise ValueError(
            f"unknown class {name!r}; expected one of {', '.join(CLASS_NAMES)}"
        ) from None


def is_cancer(name: str) -> bool:
    """True when class ``name`` is a cancer class (validates the name)."""
    class_index(name)
    return name in CANCER_CLASSES


MAX_IMAGE_PIXELS: int = 4096 * 4096
"""Largest image (width x height, read from the JPEG/PNG header before decoding) that ingest,
the training pipeline and the exported ``serving_default`` signature accept: 16.8 M pixels,
50 MB decoded. LC25000 tiles are 768 x 768; anything far larger is a mistake or a
decompression bomb (a 400 KB PNG can declare 20000 x 20000 pixels, 1.2 GB decoded)."""

MAX_BATCH_IMAGES: int = 64
"""Most images one request to the exported model may carry (the exported signatures refuse
more; ``lungtf.client`` splits at this size by default)."""

MAX_BATCH_PIXELS: int = 4 * MAX_IMAGE_PIXELS
"""Most pixels (summed over a request's images, from their headers) the exported
``serving_default`` decodes for one request: 67 M pixels, 200 MB decoded, so one request's
decoding memory is bounded however its images are sized (64 LC25000 tiles need 38 M)."""
