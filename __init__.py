"""ComfyUI entry point of the UMO node pack.

ComfyUI imports this folder as a package. Outside ComfyUI (pytest collects this folder as a
package too, and `import umo_core` must never need ComfyUI) there is no `comfy_api`, so the
nodes are only imported when ComfyUI is there.
"""

import importlib.util

if importlib.util.find_spec("comfy_api") is not None:
    from .nodes import comfy_entrypoint  # noqa: F401
