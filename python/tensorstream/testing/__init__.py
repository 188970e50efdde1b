"""Helpers for TensorStream's own tests, benchmarks and demo (not part of the user API)."""
