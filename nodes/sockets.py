"""The pack's own socket types."""

from .node_api import io

FaceModelSocket = io.Custom("UMO_FACE_MODEL")  # umo_core.FaceModel
IdentitiesSocket = io.Custom("UMO_IDENTITIES")  # umo_core.Identities

REFERENCE_INPUTS = 4  # image_1 .. image_4, besides a batch


def reference_image_inputs() -> list:
    """A batch input plus single-image inputs: one photo per person, in that order."""
    return [io.Image.Input("images", optional=True)] + [
        io.Image.Input(f"image_{i}", optional=True) for i in range(1, REFERENCE_INPUTS + 1)]


def collect_references(images, single_images: dict) -> list:
    """The reference photos [H,W,3] in order: the batch first, then image_1, image_2, ..."""
    photos = list(images) if images is not None else []
    return photos + [single_images[f"image_{i}"][0] for i in range(1, REFERENCE_INPUTS + 1)
                     if single_images.get(f"image_{i}") is not None]
