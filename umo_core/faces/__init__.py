"""The face and identity side: face packs, detection, alignment, embedding, matching, metrics, the reward,
identity guidance and WithAnyone's losses. Knows nothing of any image generator."""
