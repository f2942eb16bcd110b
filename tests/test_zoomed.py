"""Template matching of a strongly zoomed-in copy inside its source tile (real shared tiles)."""

from __future__ import annotations

import numpy as np
from conftest import lc25000_copy, two_benign_sources
from PIL import Image

from lungtf.data import zoomed


def test_zoomed_copy_is_found_in_its_source_tile_and_not_in_another(shared_data, tmp_path):
    """A real benign tile zoomed 2x about an off-centre point, rotated 140 degrees and mirrored
    is found in its source tile with a high correlation, and in a tile of another source clearly
    lower; ``group_scores`` ranks the groups the same way.

    Zoom and angle lie on the template grid (``ZOOMS``, ``ANGLE_STEP``): half a step off (2.2x,
    or 130 degrees) the same tile scores only ~0.5-0.8, and a copy is found through the other
    members of its group (other rotations and zooms of the source), hence ``MEMBERS``."""
    import cv2

    paths, image = two_benign_sources(shared_data)
    copy = lc25000_copy(image, 2.0, 140, (0.4, -0.3), (True, False), cv2.BORDER_REFLECT)
    Image.fromarray(copy).save(tmp_path / "copy.jpeg", quality=90)
    paths.append(str(tmp_path / "copy.jpeg"))

    templates = zoomed.Templates(paths[-1])
    own = templates.best(zoomed._grey(paths[0], zoomed.SIZE))
    other = templates.best(zoomed._grey(paths[2], zoomed.SIZE))
    assert own > 0.85 and own - other > zoomed.MARGIN, (own, other)
    scores = zoomed.group_scores(paths, 4, [np.array([0, 1]), np.array([2, 3])], workers=1)
    assert scores[0] == max(own, templates.best(zoomed._grey(paths[1], zoomed.SIZE)))
    assert scores[0] - scores[1] > zoomed.MARGIN, scores
