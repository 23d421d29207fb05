"""The UMO node pack: registration. Node logic lives in umo_core; these modules only wire it."""

from .backbone import ReferenceConditioning, UMOLoraLoader
from .face_fix import IdentityFaceFix
from .guidance import IdentityGuidance
from .identity import FaceModelLoader, IdentityReport, IdentityRerank, ReferenceIdentities
from .model_paths import register_insightface_folder
from .node_api import ComfyExtension, io

register_insightface_folder()

NODES: list[type[io.ComfyNode]] = [
    FaceModelLoader,
    ReferenceIdentities,
    IdentityRerank,
    IdentityReport,
    UMOLoraLoader,
    ReferenceConditioning,
    IdentityGuidance,
    IdentityFaceFix,
]


class UMOExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES


async def comfy_entrypoint() -> UMOExtension:
    return UMOExtension()
