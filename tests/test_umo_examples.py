"""UMO's published examples (bytedance/UMO, assets/examples/{UNO,OmniGen2}/N: the references, UMO's result and
the baseline's): the default ranking puts UMO's result above the baseline's, as MIMR does.

Runs when UMO_EXAMPLES points at a checkout of https://github.com/bytedance/UMO (the pictures are theirs and
are not copied here); skipped otherwise, saying so."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from umo_core.faces.scoring import DEFAULT_CRITERION, rank, score_images

UMO_EXAMPLES = os.environ.get("UMO_EXAMPLES")
BASELINES = {"UNO": "result_uno.png", "OmniGen2": "result_omnigen2.png"}


def _examples() -> list[tuple[str, Path]]:
    if not UMO_EXAMPLES:
        return []
    root = Path(UMO_EXAMPLES) / "assets" / "examples"
    return [(backbone, case) for backbone in BASELINES for case in sorted((root / backbone).glob("*"))
            if (case / "config.json").is_file()]


def _references(backbone: str, case: Path) -> list[Path]:
    """UNO's configs name the references `image_ref*` relative to the case; OmniGen2's `image_input_*` relative
    to the checkout."""
    config = json.loads((case / "config.json").read_text())
    if backbone == "UNO":
        return [case / value for key, value in sorted(config.items()) if key.startswith("image_ref")]
    return [Path(UMO_EXAMPLES) / value for key, value in sorted(config.items())
            if key.startswith("image_input") and value]


@pytest.mark.skipif(not UMO_EXAMPLES, reason="set UMO_EXAMPLES to a checkout of bytedance/UMO to rank its examples")
@pytest.mark.parametrize(("backbone", "case"), _examples(), ids=lambda value: getattr(value, "name", value))
def test_umo_result_ranks_above_the_baseline(face_model, backbone, case):
    references = _references(backbone, case)
    missing = [path for path in references if not path.is_file()]
    if missing:
        pytest.skip(f"{missing[0]} is not in the checkout (git LFS or a partial clone)")
    identities = face_model.identities(references)
    scores = score_images(face_model, identities, [case / "result.png", case / BASELINES[backbone]])
    assert rank(scores, DEFAULT_CRITERION)[0] == 0, [score.metrics for score in scores]
    assert rank(scores, "mimr")[0] == 0
