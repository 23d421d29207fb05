"""ComfyUI model folders the pack uses: `models/insightface` (face packs in its `models/` subfolder)."""

from __future__ import annotations

import os
from pathlib import Path

import folder_paths

from umo_core.faces.face_pack import DEFAULT_PACK

INSIGHTFACE = "insightface"


def register_insightface_folder() -> None:
    """Add `models/insightface` like PuLID/IPAdapter do, keeping paths from extra_model_paths.yaml."""
    default = os.path.join(folder_paths.models_dir, INSIGHTFACE)
    if INSIGHTFACE in folder_paths.folder_names_and_paths:
        paths = folder_paths.folder_names_and_paths[INSIGHTFACE][0]
        if default not in paths:
            paths.append(default)
    else:
        folder_paths.folder_names_and_paths[INSIGHTFACE] = ([default], set())


def insightface_roots() -> list[Path]:
    return [Path(p) for p in folder_paths.get_folder_paths(INSIGHTFACE)]


def face_pack_names() -> list[str]:
    """Pack folders found under every `<insightface>/models/`."""
    names = {p.name for root in insightface_roots() if (root / "models").is_dir()
             for p in (root / "models").iterdir() if p.is_dir()}
    return sorted(names) or [DEFAULT_PACK]  # the name a missing-pack error then explains
