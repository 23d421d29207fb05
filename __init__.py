"""ComfyUI entry point of the UMO node pack.

ComfyUI imports this folder as a package. Outside ComfyUI (pytest collects this folder as a
package too, and `import umo_core` must never need ComfyUI) there is no `comfy_api`, so the
nodes are only imported when ComfyUI is there. A pip-installed ComfyUI (0.12.1's fork) has `comfy_api` everywhere
but provides the top-level `folder_paths` the nodes import only once its server prepares for custom nodes.
"""

import importlib.util
import os
import sys

if importlib.util.find_spec("comfy_api") is not None and importlib.util.find_spec("folder_paths") is not None:
    # The nodes import `umo_core` as a top-level package, and ComfyUI does not put a pack's folder on
    # sys.path (a clone in custom_nodes has no pip install of umo_core). Appended, not prepended, so this
    # folder's `nodes` package never shadows ComfyUI's own `nodes` module.
    PACK_DIR = os.path.dirname(os.path.abspath(__file__))
    if PACK_DIR not in sys.path:
        sys.path.append(PACK_DIR)

    from .nodes import comfy_entrypoint  # noqa: F401
