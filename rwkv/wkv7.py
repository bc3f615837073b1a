"""The WKV-7 state recurrence: a float32 reference in PyTorch and the chunked flash-linear-attention kernel.

Per head, with a (K, V) state S and per-token vectors r, w, k, a, b of size K and v of size V:

    S_t = diag(exp(w_t)) S_{t-1} + b_t (a_t^T S_{t-1}) + k_t v_t^T
    o_t = S_t^T r_t

``w`` is the log decay (< 0). RWKV-7 uses a = -kk and b = kk * iclr (the normalized key and the
in-context learning rate), which makes ``diag(exp(w)) + b a^T`` a decayed delta-rule update.
This is the diagonal-plus-low-rank form that fla's ``chunk_rwkv7`` computes.
"""

from __future__ import annotations

import torch

from training_harness.kernel_pins import kernel_choice

FLA_PATH = "flash-linear-attention chunk_rwkv7 (Triton, chunked DPLR)"
REFERENCE_PATH = "PyTorch reference WKV-7 recurrence (slow)"
#: RWKV-7 bounds the log decay to [-exp(-0.5), 0); telling the kernel lets it use tensor cores safely.
LOG_DECAY_LOWER_BOUND = -0.6065306597126334


def fla_kernel_choice() -> str | None:
    """How fla's kernels are chosen ("pinned ..." or "autotuned ..."), or None without fla."""
    return kernel_choice("rwkv")


def fla_available() -> bool:
    return fla_kernel_choice() is not None


@torch.compiler.disable  # a Python loop over tokens: tracing it would unroll the sequence
def wkv7_reference(r, w, k, v, a, b, initial_state=None):
    """Float32 recurrence, one token at a time, vectorized over batch and heads.

    r, w, k, a, b: (B, T, H, K); v: (B, T, H, V); initial_state: (B, H, K, V) or None.
    Returns o: (B, T, H, V) in v's dtype, and the final state (B, H, K, V) in float32.
    """
    batch, length, heads, key_dim = r.shape
    r, w, k, v, a, b = (t.float() for t in (r, w, k, v, a, b))
    state = r.new_zeros(batch, heads, key_dim, v.shape[-1]) if initial_state is None else initial_state.float()
    outputs = []
    for t in range(length):
        removed = torch.einsum("bhk,bhkv->bhv", a[:, t], state)  # a^T S: what the delta rule replaces
        state = (w[:, t].exp().unsqueeze(-1) * state
                 + b[:, t].unsqueeze(-1) * removed.unsqueeze(-2)
                 + k[:, t].unsqueeze(-1) * v[:, t].unsqueeze(-2))
        outputs.append(torch.einsum("bhk,bhkv->bhv", r[:, t], state))
    return torch.stack(outputs, dim=1), state


@torch.compiler.disable  # Triton kernels behind an autograd.Function: dynamo must not trace into them
def wkv7_fla(r, w, k, v, a, b):
    """The chunked Triton kernel; same arguments and result as ``wkv7_reference`` (without the state)."""
    fla_kernel_choice()  # the first import of fla pins its kernel configurations
    from fla.ops.rwkv7 import chunk_rwkv7

    output, _ = chunk_rwkv7(r, w, k, v, a, b, scale=1.0, safe_gate=True, lower_bound=LOG_DECAY_LOWER_BOUND)
    return output
