"""Runs in the driver: training and held-out rows (hub, local files, synthetic problems), read
and checked before any actor starts, and the resumable prompt iterator. `datasets` and
`transformers` load inside the functions."""
