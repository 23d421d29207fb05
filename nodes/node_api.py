"""The one place the pack imports ComfyUI's node API from.

ComfyUI's maintainers advise custom nodes to pin a versioned API module; `comfy_api.v0_0_2` is in every
ComfyUI the pack is tested with (0.3.64 to 0.8.x). Only a ComfyUI without it gets the current `latest`.
"""

try:
    from comfy_api.v0_0_2 import ComfyExtension, io, ui

    NODE_API = "comfy_api.v0_0_2"
except ImportError:  # a ComfyUI that dropped the pinned version
    from comfy_api.latest import ComfyExtension, io, ui

    NODE_API = "comfy_api.latest"

__all__ = ["NODE_API", "ComfyExtension", "io", "ui"]
