"""RWKV-7: a linear-time recurrent model with the WKV-7 state update (fla kernels on CUDA)."""
