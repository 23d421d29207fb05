"""The ReReFL trainer: `python -m training.rerefl` (see README)."""
