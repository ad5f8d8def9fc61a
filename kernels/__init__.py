"""Triton GPU kernels and their torch references (imported as paged_backend.kernels)."""
