"""Mamba-2: the state-space duality (SSD) layer (mamba-ssm's chunked Triton scan on CUDA)."""
