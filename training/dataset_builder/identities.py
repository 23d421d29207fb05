"""Who is who: faces matched to the --people folders, or grouped into identities by clustering.

Both use the cosine similarity of the face network's embeddings. ArcFace-style networks put photos
of one person at about 0.4 and above (insightface's own tools use 0.40-0.45; WithAnyone measured a
median of 0.46 for real photo pairs) and different people at 0.0-0.2; the face-assets MobileFaceNet
gives 0.43-0.9 for the same person and at most 0.31 (0.42 in the worst case seen) for different ones.
SAME_PERSON_SIMILARITY = 0.4 sits between the two for both.

- Matching (--people): per photo, the Hungarian assignment between its faces and the people on the
  similarity to each person's closest embedding (one per photo of theirs), so no two faces of a photo
  get the same person; a pair below --match-threshold leaves the face unknown.
- Clustering: agglomerative with average linkage on the cosine distance (scipy.cluster.hierarchy),
  cut at --cluster-threshold = 1 - SAME_PERSON_SIMILARITY: two groups merge while their faces are on
  average at least that similar. Average linkage does not chain different people through one
  ambiguous face, as single linkage does. Memory grows with faces squared (8 bytes a pair: 10k faces
  take 0.4 GB). Clusters are named person_0001, person_0002, ... in the order of their first face
  (photos by name, faces left to right), so the same photos always give the same names.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.cluster.hierarchy import fcluster, linkage

from umo_core import assign

SAME_PERSON_SIMILARITY = 0.4
DEFAULT_MATCH_THRESHOLD = SAME_PERSON_SIMILARITY
DEFAULT_CLUSTER_THRESHOLD = 1.0 - SAME_PERSON_SIMILARITY

FaceId = tuple[str, int]  # (photo name, face index in the photo, left to right)


def match_people(faces: dict[str, tuple[list[int], np.ndarray]], people: dict[str, np.ndarray],
                 threshold: float) -> dict[FaceId, str]:
    """Identity of each matched face. faces: photo -> (face indices, embeddings [F,D]); people: name -> [K,D]."""
    names = sorted(people)
    labels: dict[FaceId, str] = {}
    for photo, (indices, embeddings) in faces.items():
        if not indices:
            continue
        similarity = np.stack([(people[name] @ embeddings.T).max(axis=0) for name in names])  # [P,F]
        for person, face in enumerate(assign(torch.from_numpy(similarity))):
            if face is not None and similarity[person, face] >= threshold:
                labels[(photo, indices[face])] = names[person]
    return labels


def cluster_faces(face_ids: list[FaceId], embeddings: np.ndarray, threshold: float) -> dict[FaceId, str]:
    """person_NNNN of every face; face_ids in the order that numbers the clusters (sorted photos)."""
    if len(face_ids) == 0:
        return {}
    if len(face_ids) == 1:
        clusters = np.ones(1, int)
    else:
        tree = linkage(embeddings.astype(np.float64), method="average", metric="cosine")
        clusters = fcluster(tree, t=threshold, criterion="distance")
    names: dict[int, str] = {}
    for cluster in clusters:
        names.setdefault(int(cluster), f"person_{len(names) + 1:04d}")
    return {face: names[int(cluster)] for face, cluster in zip(face_ids, clusters)}
