"""Mamba-1: a selective state-space model (mamba-ssm kernels on CUDA)."""
