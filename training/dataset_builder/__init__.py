"""Building a UMO training set from a photo collection; `python -m training.prepare_data` runs it.

One job per module: photos (finding files), faces (what is measured per face), cache (the on-disk
embedding cache), embedding_pass (detect + embed over many photos, sharded), filters (quality rules),
identities (matching to --people or clustering), rows (manifest rows and references), writer (the
data folders), sheets (contact sheets) and report (report.json / report.md).
"""
