"""The WKV-7 state recurrence: a float32 reference in PyTorch and the chunked flash-linear-attention kernel.

Per head, with a (K, V) state S and per-token vectors r, w, k, a, b of size K and v of size V:

    S_t = diag(exp(w_t)) S_{t-1} + b_t (a_t^T S_{t-1}) + k_t v_t^T
    o_t = S_t^T r_t

``w`` is the log decay (< 0). RWKV-7 uses a = -kk and b = kk * iclr (the normalized key and the
in-context learning rate), which makes ``diag(exp(w)) + b a^T`` a decayed delta-rule update.
This is the diagonal-plus-low-rank form that fla's ``chunk_rwkv7`` computes; ``ChunkWKV7`` runs its kernels.
"""

from __future__ import annotations

import torch

from training_harness.kernel_pins import kernel_choice

FLA_PATH = "flash-linear-attention's chunked DPLR kernels (Triton)"
#: The fla release whose internal functions ``ChunkWKV7`` calls. With any other, RWKV-7 runs fla's public
#: ``chunk_rwkv7``: the same kernels, the chunk states recomputed in the backward.
CHUNK_STATES_FLA_VERSION = "0.6.0"
REFERENCE_PATH = "PyTorch reference WKV-7 recurrence (slow)"
#: RWKV-7 bounds the log decay to [-exp(-0.5), 0), which lets fla's kernels use tensor cores on 64-token chunks.
LOG_DECAY_LOWER_BOUND = -0.6065306597126334


def fla_kernel_choice() -> str | None:
    """How fla's kernels are chosen ("pinned ..." or "autotuned ..."), or None without fla."""
    return kernel_choice("rwkv")


def fla_available() -> bool:
    return fla_kernel_choice() is not None


def keeps_chunk_states() -> bool:
    """Whether the installed fla is the release ``ChunkWKV7`` was written against (fla must be importable)."""
    import fla

    return fla.__version__ == CHUNK_STATES_FLA_VERSION


def fla_path() -> str:
    """The kernel path that ``wkv7_fla`` runs with the installed fla, for the results' ``kernel_path``."""
    import fla

    if keeps_chunk_states():
        return f"{FLA_PATH}, chunk states kept for the backward"
    return f"{FLA_PATH}, fla {fla.__version__}'s chunk_rwkv7 (chunk states recomputed in the backward)"


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


class ChunkWKV7(torch.autograd.Function):
    """fla's chunked DPLR kernels, the ones ``chunk_rwkv7`` runs, with two of the forward's results kept for the
    backward: the state at each chunk's start (h) and the chunks' corrected values (v_new). fla's own backward
    recomputes every intermediate of the forward, and the state pass, one kernel walking the chunks in turn, is
    the most costly of them; its two results take as much memory as two of the block's bf16 activations. The
    rest (cumulative decays, in-chunk matrices, WY form) is recomputed as fla does. The same arithmetic as
    ``chunk_rwkv7``; 8.6-13 % faster at the plans' shapes (docs/performance.md, change 50). It calls fla's
    internal functions as fla 0.6.0 defines them (``CHUNK_STATES_FLA_VERSION``); ``wkv7_fla`` uses it with that
    release only.
    r, log_decay, k, v, a, b: (B, T, H, K), one dtype."""

    @staticmethod
    def forward(ctx, r, log_decay, k, v, a, b):
        from fla.ops.generalized_delta_rule.dplr.chunk import chunk_dplr_fwd

        r, log_decay, k, v, a, b = (t.contiguous() for t in (r, log_decay, k, v, a, b))
        ctx.chunk_size = _chunk_size()
        output, _, _, intermediates = chunk_dplr_fwd(
            q=r, k=k, v=v, a=a, b=b, gk=log_decay, scale=1.0, initial_state=None, output_final_state=False,
            chunk_size=ctx.chunk_size, safe_gate=True, disable_recompute=True)
        *_, states, new_values, _ = intermediates  # ..., h, v_new, A_ab_inv
        ctx.save_for_backward(r, log_decay, k, v, a, b, states, new_values)
        return output.to(r.dtype)

    @staticmethod
    def backward(ctx, d_output):
        from fla.ops.generalized_delta_rule.dplr import (
            chunk_A_bwd,
            chunk_A_fwd,
            chunk_h_bwd,
            chunk_o_bwd,
            wy_fast_bwd,
            wy_fast_fwd,
        )
        from fla.ops.rwkv6.chunk import chunk_rwkv6_fwd_cumsum
        from fla.ops.utils.constant import RCP_LN2

        r, log_decay, k, v, a, b, states, new_values = ctx.saved_tensors
        d_output, chunk = d_output.contiguous(), ctx.chunk_size
        gi, ge = chunk_rwkv6_fwd_cumsum(log_decay, chunk, scale=RCP_LN2)
        A_ab, A_qk, A_ak, A_qb, qg, kg, ag, bg = chunk_A_fwd.chunk_dplr_fwd_intra(
            q=r, k=k, a=a, b=b, gi=gi, ge=ge, scale=1.0, chunk_size=chunk, safe_gate=True)
        w, _, A_ab_inv = wy_fast_fwd.prepare_wy_repr_fwd(ag=ag, A_ab=A_ab, A_ak=A_ak, v=v, cu_seqlens=None,
                                                         chunk_size=chunk, safe_gate=True)
        del A_ab
        dv_new_intra, dA_qk, dA_qb = chunk_o_bwd.chunk_dplr_bwd_dAu(v=v, v_new=new_values, do=d_output, A_qb=A_qb,
                                                                   scale=1.0, chunk_size=chunk)
        dh, _, dv_new = chunk_h_bwd.chunk_dplr_bwd_dhu(qg=qg, bg=bg, w=w, gk=gi, h0=None, dht=None, do=d_output,
                                                      dv=dv_new_intra, chunk_size=chunk)
        dv = chunk_o_bwd.chunk_dplr_bwd_dv(A_qk=A_qk, kg=kg, do=d_output, dh=dh, chunk_size=chunk)
        dqg, dkg, dw, dbg, dgk_last = chunk_o_bwd.chunk_dplr_bwd_o(
            k=kg, b=bg, v=v, v_new=new_values, do=d_output, h=states, dh=dh, dv=dv_new, w=w, gk=gi,
            chunk_size=chunk, scale=1.0)
        dA_ab, dA_ak, dv, dag = wy_fast_bwd.chunk_dplr_bwd_wy(A_ab_inv=A_ab_inv, A_ak=A_ak, v=v, ag=ag, dw=dw,
                                                              du=dv_new, dv0=dv, cu_seqlens=None, chunk_size=chunk)
        dr, dk, da, db, d_log_decay = chunk_A_bwd.chunk_dplr_bwd_dqk_intra(
            q=r, k=k, a=a, b=b, gi=gi, ge=ge, dAqk=dA_qk, dAqb=dA_qb, dAak=dA_ak, dAab=dA_ab, dqg=dqg, dkg=dkg,
            dag=dag, dbg=dbg, dgk_last=dgk_last, scale=1.0, chunk_size=chunk, safe_gate=True)
        return dr.to(r), d_log_decay.to(log_decay), dk.to(k), dv.to(v), da.to(a), db.to(b)


def _chunk_size() -> int:
    """What ``chunk_rwkv7`` chooses when told the decay's bound: 64 tokens, 16 where Triton is older than 3.4."""
    from fla.ops.generalized_delta_rule.dplr.chunk import gate_bound_is_safe
    from fla.utils import TRITON_ABOVE_3_4_0

    return 64 if TRITON_ABOVE_3_4_0 and gate_bound_is_safe(LOG_DECAY_LOWER_BOUND, 64) else 16


@torch.compiler.disable  # Triton kernels behind an autograd.Function: dynamo must not trace into them
def wkv7_fla(r, w, k, v, a, b):
    """The chunked Triton kernels; same arguments and result as ``wkv7_reference`` (without the state)."""
    fla_kernel_choice()  # the first import of fla pins its kernel configurations
    if keeps_chunk_states():
        return ChunkWKV7.apply(r, w, k, v, a, b)
    from fla.ops.rwkv7 import chunk_rwkv7

    output, _ = chunk_rwkv7(r, w, k, v, a, b, scale=1.0, safe_gate=True, lower_bound=LOG_DECAY_LOWER_BOUND)
    return output
