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

SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")
"""Split names used in manifests, in ratio order."""

PROTOCOL_GROUPED = "grouped"
PROTOCOL_RANDOM = "random (leaky)"
SPLIT_PROTOCOLS: tuple[str, ...] = (PROTOCOL_GROUPED, PROTOCOL_RANDOM)
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
