"""umo_core: multi-identity face matching and UMO rewards, importable without ComfyUI."""

from .errors import UMOError
from .faces.detection import Faces
from .faces.face_model import FaceModel, Identities, load_face_model
from .faces.matching import IdentityMatch, assign, match_identities, mimr, similarity_matrix, sir
from .faces.metrics import identity_metrics
from .faces.reward import identity_reward
from .faces.scoring import ImageScore, rank, score_images

__all__ = [
    "FaceModel", "Faces", "Identities", "IdentityMatch", "ImageScore", "UMOError", "assign", "identity_metrics",
    "identity_reward", "load_face_model", "match_identities", "mimr", "rank", "score_images", "similarity_matrix",
    "sir",
]
