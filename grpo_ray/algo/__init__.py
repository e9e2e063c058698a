"""The algorithm: pure torch functions, nothing distributed."""
