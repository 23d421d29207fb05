"""The backbone contract: every trainable backbone implements it, and the registry is the only way in."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from umo_core import UMOError
from umo_core.backbones import NAMES, TRAINABLE, get
from umo_core.backbones.contract import Backbone

ROOT = Path(__file__).resolve().parents[1]
CONTRACT_MEMBERS = [name for name in dir(Backbone) if not name.startswith("_")] + list(Backbone.__annotations__)


@pytest.mark.parametrize("name", TRAINABLE)
def test_every_trainable_backbone_has_the_whole_contract(name):
    backbone = get(name)
    missing = [member for member in CONTRACT_MEMBERS if not hasattr(backbone, member)]
    assert not missing and backbone.name == name


def test_an_unknown_backbone_is_named():
    with pytest.raises(UMOError, match="backbone 'flux3' is not one of flux1, flux2"):
        get("flux3")


def test_no_module_outside_a_backbone_folder_imports_it_by_name():
    """The trainer, generate, the evaluation and the nodes choose a backbone through `get` only."""
    by_name = re.compile(r"^\s*from\s+(?:umo_core\.|\.+)backbones\.(" + "|".join(NAMES) + r")\b", re.MULTILINE)
    offenders = []
    for folder in ("umo_core", "training", "nodes"):
        for path in (ROOT / folder).rglob("*.py"):
            inside = any(f"backbones/{name}/" in path.as_posix() for name in NAMES)
            if not inside and by_name.search(path.read_text()):
                offenders.append(str(path.relative_to(ROOT)))
    assert not offenders
