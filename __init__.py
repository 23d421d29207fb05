"""ComfyUI entry point of the UMO node pack.

ComfyUI imports this folder as a package. Outside ComfyUI (pytest collects this folder as a
package too, and `import umo_core` must never need ComfyUI) there is no `comfy_api`, so the
nodes are only imported when ComfyUI is there.
"""

import importlib.util
import os
import sys

if importlib.util.find_spec("comfy_api") is not None:
    # The nodes import `umo_core` as a top-level package, and ComfyUI does not put a pack's folder on
    # sys.path (a clone in custom_nodes has no pip install of umo_core). Appended, not prepended, so this
    # folder's `nodes` package never shadows ComfyUI's own `nodes` module.
    PACK_DIR = os.path.dirname(os.path.abspath(__file__))
    if PACK_DIR not in sys.path:
        sys.path.append(PACK_DIR)

    from .nodes import comfy_entrypoint  # noqa: F401
