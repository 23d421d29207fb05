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

from umo_core import UMOError, assign

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


def own_faces(person: str, candidates: dict[str, list[int]], photos: dict, threshold: float
              ) -> tuple[dict[str, int], dict[str, str], list[str]]:
    """Which face of each photo of a --people folder is that person: (photo -> face, photo left out -> why, warnings).

    candidates: photo -> its faces that are not background. In each photo the person is the face that matches (at
    least `threshold`) a face in the most other photos of the folder, the larger on a tie. A photo where no face
    matches any other photo is left out with a warning: a group photo in the folder must not make a stranger
    this person. With a single photo its largest face is taken (with a
    warning when it shows several faces, as nothing can say which one is the person).
    """
    names = [name for name, faces in candidates.items() if faces]
    if len(names) == 1:
        name = names[0]
        faces = candidates[name]
        sides = photos[name].face_sides()
        warnings = [f"--people '{person}': '{_photo_file(name)}' shows {len(faces)} faces and is the folder's only "
                    f"photo; its largest face is taken as {person} (add another photo of {person} to tell)"
                    ] if len(faces) > 1 else []
        return {name: max(faces, key=lambda j: sides[j])}, {}, warnings
    support: dict[tuple[str, int], int] = {}
    for name in names:
        for j in candidates[name]:
            embedding = photos[name].embeddings[j]
            support[(name, j)] = sum(
                bool(np.max(photos[other].embeddings[candidates[other]] @ embedding) >= threshold)
                for other in names if other != name)
    chosen, left_out, warnings = {}, {}, []
    for name in names:
        sides = photos[name].face_sides()
        best = max(candidates[name], key=lambda j: (support[(name, j)], sides[j]))
        if support[(name, best)] == 0:
            left_out[name] = f"no face in it matches {person}'s other photos"
            warnings.append(f"--people '{person}': '{_photo_file(name)}': no face in it matches the folder's other "
                            f"photos, so it is left out (is it a photo of {person}?)")
        else:
            chosen[name] = best
    if not chosen and names:
        raise UMOError(f"--people '{person}': no two of its {len(names)} photos show the same face; put photos of "
                       f"{person} only in the folder")
    return chosen, left_out, warnings


def _photo_file(name: str) -> str:
    """A --people photo's name without the people: prefix (person/file)."""
    return name.split(":", 1)[-1]
