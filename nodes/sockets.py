"""The pack's own socket types."""

from comfy_api.latest import io

FaceModelSocket = io.Custom("UMO_FACE_MODEL")  # umo_core.FaceModel
IdentitiesSocket = io.Custom("UMO_IDENTITIES")  # umo_core.Identities
