"""umo_core: multi-identity face matching and UMO rewards, importable without ComfyUI."""

from .detection import Faces
from .errors import UMOError
from .face_model import FaceModel, Identities, load_face_model
from .matching import assign, mimr, similarity_matrix, sir
from .metrics import identity_metrics
from .reward import identity_reward
from .scoring import rank, score_images

__all__ = [
    "FaceModel", "Faces", "Identities", "UMOError", "assign", "identity_metrics", "identity_reward",
    "load_face_model", "mimr", "rank", "score_images", "similarity_matrix", "sir",
]
