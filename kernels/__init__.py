"""Codec kernels: Triton launchers and their pure-torch reference twins."""
