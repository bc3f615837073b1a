"""Gated DeltaNet: the gated delta rule with short convolutions (flash-linear-attention kernels on CUDA)."""
