"""The demo's page content: HTML of each tile's answer, the results panel, the footer and the CSS.

Plain functions of predictions and metadata (no Gradio, no gRPC), so tests check what a person
reads without a server; ``lungtf.demo`` fills them from the served model's answers.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lungtf.client import Prediction
from lungtf.constants import CLASS_DESCRIPTIONS, CLASS_NAMES, PROTOCOL_GROUPED

UNCERTAIN = "Uncertain \u2014 refer to a pathologist"
DISCLAIMER = (
    "Research tool, not a diagnosis: trained on LC25000 tiles only, never validated clinically. "
    "Every tile needs a pathologist's review."
)
CSS = """
.lungtf-tile {border: 1px solid #d0d0d0; border-radius: 8px; padding: 10px; margin: 8px 0;
  display: flex; gap: 12px; align-items: flex-start;}
.lungtf-tile img {width: 96px; height: 96px; object-fit: cover; border-radius: 4px;}
.lungtf-body {flex: 1;}
.lungtf-tile img.lungtf-overlay {width: 160px; height: 160px;}
.lungtf-name {font-weight: 600;}
.lungtf-bar {display: flex; align-items: center; gap: 8px; margin: 2px 0;}
.lungtf-bar .lungtf-class {width: 190px;}
.lungtf-track {flex: 1; background: #eee; height: 14px; border-radius: 3px;}
.lungtf-fill {background: #4a7bd0; height: 14px; border-radius: 3px;}
.lungtf-top .lungtf-fill {background: #1f4fa3;}
.lungtf-prob {width: 60px; text-align: right; font-variant-numeric: tabular-nums;}
.lungtf-flag, .lungtf-error, .lungtf-alert {color: #8a1c00; background: #fff1e6;
  border-left: 4px solid #d9480f; padding: 4px 8px; margin: 4px 0;}
"""


def format_probability(p: float) -> str:
    """A probability as the page shows it: a percentage with one decimal (``0.4127`` -> ``41.3%``)."""
    return f"{100.0 * p:.1f}%"


def is_uncertain(prediction: Prediction, threshold: float | None) -> bool:
    """True when the top probability is below ``threshold`` (never when there is no threshold)."""
    return threshold is not None and max(prediction.probabilities.values()) < threshold


@dataclass(frozen=True)
class TileResult:
    """What the page shows for one tile: its name and either a prediction or an error message."""

    name: str
    prediction: Prediction | None = None
    error: str | None = None
    thumbnail: str | None = None
    overlay: str | None = None


def render_tile(result: TileResult, threshold: float | None) -> str:
    """HTML of one tile: bars for the three classes, the answer in words, the uncertainty flag."""
    name = html.escape(result.name)
    img = f'<img src="{result.thumbnail}" alt="{name}">' if result.thumbnail else ""
    head = f'<div class="lungtf-tile" data-name="{name}">{img}<div class="lungtf-body">'
    head += f'<div class="lungtf-name">{name}</div>'
    if result.prediction is None:
        return (
            head + f'<div class="lungtf-error">{html.escape(result.error or "")}</div></div></div>'
        )
    pred = result.prediction
    answer = f"<b>{CLASS_DESCRIPTIONS[pred.label]}</b> ({pred.label})"
    lines = [head, f'<div class="lungtf-answer">Predicted: {answer}</div>']
    if is_uncertain(pred, threshold):
        top = max(pred.probabilities.values())
        lines.append(
            f'<div class="lungtf-flag">&#9888; {UNCERTAIN}: the top probability '
            f"{format_probability(top)} is below the threshold {format_probability(threshold)}."
            "</div>"
        )
    for cls in CLASS_NAMES:
        p = pred.probabilities[cls]
        top_class = " lungtf-top" if cls == pred.label else ""
        lines.append(
            f'<div class="lungtf-bar{top_class}" data-class="{cls}">'
            f'<span class="lungtf-class">{CLASS_DESCRIPTIONS[cls]}</span>'
            f'<div class="lungtf-track"><div class="lungtf-fill" style="width:{100 * p:.1f}%">'
            f'</div></div><span class="lungtf-prob">{format_probability(p)}</span></div>'
        )
    lines.append("</div>")
    if result.overlay:
        lines.append(
            f'<img class="lungtf-overlay" src="{result.overlay}" alt="evidence for {name}" '
            'title="Grad-CAM: where the model looked for the predicted class">'
        )
    return "".join(lines) + "</div>"


def render_results(results: Sequence[TileResult], threshold: float | None, alert: str = "") -> str:
    """The results panel: an optional page-level alert, then one block per tile."""
    parts = [f'<div class="lungtf-alert">{html.escape(alert)}</div>'] if alert else []
    parts += [render_tile(r, threshold) for r in results]
    if not parts:
        parts = ['<p class="lungtf-empty">Upload JPEG/PNG tiles or click an example.</p>']
    return '<div class="lungtf-results">' + "".join(parts) + "</div>"


def footer_text(
    metadata: dict[str, Any] | None, version: int | None, target: str, error: str = ""
) -> str:
    """Markdown footer: served version, grouped-split test metrics, protocol and the disclaimer."""
    if metadata is None:
        return f"**Model:** unknown ({error or f'no answer from {target}'}).\n\n**{DISCLAIMER}**"
    ident = f"`{metadata.get('backbone', 'lungtf')}`"
    if metadata.get("variant"):
        ident += f" ({metadata['variant']})"
    served = version if version is not None else "unknown"
    parts = [f"**Model:** {ident} version {served}, served at `{target}`"]
    protocol = metadata.get("split_protocol", "unknown")
    test = metadata.get("test_metrics") or {}
    if "accuracy" in test:
        parts.append(
            f"**Test accuracy:** {format_probability(float(test['accuracy']))} on "
            f"{test.get('n', '?')} held-out tiles, **missed cancers:** "
            f"{test.get('missed_cancers', '?')} (cancer tiles called benign)"
        )
    else:
        parts.append("**Test metrics:** not recorded in this model's lungtf.json")
    if protocol == PROTOCOL_GROUPED:
        parts.append(
            "**Split protocol:** grouped (rotated/flipped copies of a source tile never "
            "cross splits, so the test tiles are unseen)"
        )
    else:
        parts.append(
            f"**Split protocol:** {protocol} (near-duplicate tiles may cross splits, so "
            "the test accuracy is inflated)"
        )
    threshold = metadata.get("uncertainty_threshold")
    if threshold is not None:
        parts.append(
            f"tiles whose top probability is below {format_probability(threshold)} "
            "(chosen on the validation split) are flagged uncertain"
        )
    else:
        parts.append("no uncertainty threshold in this model's lungtf.json: no tile is flagged")
    return " \u00b7 ".join(parts) + f"\n\n**{DISCLAIMER}**"
