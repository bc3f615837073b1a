"""The WKV-7 state recurrence: a float32 reference in PyTorch and the chunked flash-linear-attention kernel.

Per head, with a (K, V) state S and per-token vectors r, w, k, a, b of size K and v of size V:

    S_t = diag(exp(w_t)) S_{t-1} + b_t (a_t^T S_{t-1}) + k_t v_t^T
    o_t = S_t^T r_t

``w`` is the log decay (< 0). RWKV-7 uses a = -kk and b = kk * iclr (the normalized key and the
in-context learning rate), which makes ``diag(exp(w)) + b a^T`` a decayed delta-rule update.
This is the diagonal-plus-low-rank form that fla's ``chunk_rwkv7`` computes; ``ChunkWKV7`` runs its kernels.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

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
    """fla's chunked DPLR kernels, the ones ``chunk_rwkv7`` runs, in the same order with the same arithmetic,
    with three changes:
    - two of the forward's results are kept for the backward: the state at each chunk's start (h) and the
      chunks' corrected values (v_new). fla's own backward recomputes every intermediate of the forward, and the
      state pass, one kernel walking the chunks in turn, is the most costly of them; its two results take as
      much memory as two of the block's bf16 activations.
    - with ``keep_in_chunk_terms``, the in-chunk matrices, the decayed inputs and the WY form are kept as well
      (``InChunkTerms``: as much memory as 11 of the block's bf16 activations, 0.74 GB per 32,768 tokens),
      which saves recomputing them in the backward; only the cumulative decays are recomputed. Without it they are
      recomputed as fla does.
    - both state passes run in blocks of value columns narrow enough to keep every multiprocessor busy
      (``_state_pass_blocks``).
    Faster than ``chunk_rwkv7`` at the plans' shapes (docs/performance.md, changes 50, 54 and 55). It calls
    fla's internal functions and kernels as fla 0.6.0 defines them (``CHUNK_STATES_FLA_VERSION``); ``wkv7_fla``
    uses it with that release only.
    r, log_decay, k, v, a, b: (B, T, H, K), one dtype."""

    @staticmethod
    def forward(ctx, r, log_decay, k, v, a, b, keep_in_chunk_terms: bool):
        from fla.ops.generalized_delta_rule.dplr import chunk_o_fwd

        r, log_decay, k, v, a, b = (t.contiguous() for t in (r, log_decay, k, v, a, b))
        ctx.chunk_size = chunk = _chunk_size()
        gi, ge = _cumulative_decays(log_decay, chunk)
        terms, u = _in_chunk_terms(r, k, v, a, b, gi, ge, chunk)
        states, new_values = _forward_state_pass(kg=terms.kg, v=v, w=terms.w, u=u, bg=terms.bg, gi=gi,
                                                 chunk_size=chunk)
        output = chunk_o_fwd.chunk_dplr_fwd_o(qg=terms.qg, v=v, v_new=new_values, A_qk=terms.A_qk,
                                              A_qb=terms.A_qb, h=states, chunk_size=chunk)
        ctx.save_for_backward(r, log_decay, k, v, a, b, states, new_values, *(terms if keep_in_chunk_terms else ()))
        return output.to(r.dtype)

    @staticmethod
    def backward(ctx, d_output):
        from fla.ops.generalized_delta_rule.dplr import chunk_A_bwd, chunk_o_bwd, wy_fast_bwd

        r, log_decay, k, v, a, b, states, new_values, *kept = ctx.saved_tensors
        d_output, chunk = d_output.contiguous(), ctx.chunk_size
        gi, ge = _cumulative_decays(log_decay, chunk)
        A_qk, A_qb, A_ak, qg, kg, ag, bg, w, A_ab_inv = kept or _in_chunk_terms(r, k, v, a, b, gi, ge, chunk)[0]
        dv_new_intra, dA_qk, dA_qb = chunk_o_bwd.chunk_dplr_bwd_dAu(v=v, v_new=new_values, do=d_output, A_qb=A_qb,
                                                                   scale=1.0, chunk_size=chunk)
        dh, dv_new = _backward_state_pass(qg=qg, bg=bg, w=w, gi=gi, d_output=d_output, dv=dv_new_intra,
                                          chunk_size=chunk)
        dv = chunk_o_bwd.chunk_dplr_bwd_dv(A_qk=A_qk, kg=kg, do=d_output, dh=dh, chunk_size=chunk)
        dqg, dkg, dw, dbg, dgk_last = chunk_o_bwd.chunk_dplr_bwd_o(
            k=kg, b=bg, v=v, v_new=new_values, do=d_output, h=states, dh=dh, dv=dv_new, w=w, gk=gi,
            chunk_size=chunk, scale=1.0)
        dA_ab, dA_ak, dv, dag = wy_fast_bwd.chunk_dplr_bwd_wy(A_ab_inv=A_ab_inv, A_ak=A_ak, v=v, ag=ag, dw=dw,
                                                              du=dv_new, dv0=dv, cu_seqlens=None, chunk_size=chunk)
        dr, dk, da, db, d_log_decay = chunk_A_bwd.chunk_dplr_bwd_dqk_intra(
            q=r, k=k, a=a, b=b, gi=gi, ge=ge, dAqk=dA_qk, dAqb=dA_qb, dAak=dA_ak, dAab=dA_ab, dqg=dqg, dkg=dkg,
            dag=dag, dbg=dbg, dgk_last=dgk_last, scale=1.0, chunk_size=chunk, safe_gate=True)
        return dr.to(r), d_log_decay.to(log_decay), dk.to(k), dv.to(v), da.to(a), db.to(b), None


class InChunkTerms(NamedTuple):
    """What the backward needs of the forward's in-chunk work: the in-chunk matrices (A_*, float32 where fla
    keeps them so), the inputs scaled by their cumulative decays (*g) and the WY form (w, A_ab_inv)."""

    A_qk: torch.Tensor
    A_qb: torch.Tensor
    A_ak: torch.Tensor
    qg: torch.Tensor
    kg: torch.Tensor
    ag: torch.Tensor
    bg: torch.Tensor
    w: torch.Tensor
    A_ab_inv: torch.Tensor


def _cumulative_decays(log_decay: torch.Tensor, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The log decays summed within each chunk, inclusive and exclusive (float32, base 2)."""
    from fla.ops.rwkv6.chunk import chunk_rwkv6_fwd_cumsum
    from fla.ops.utils.constant import RCP_LN2

    return chunk_rwkv6_fwd_cumsum(log_decay, chunk_size, scale=RCP_LN2)


def _in_chunk_terms(r, k, v, a, b, gi, ge, chunk_size: int) -> tuple[InChunkTerms, torch.Tensor]:
    """fla's in-chunk matrices and WY form, and the WY form's values (u), which only the forward needs."""
    from fla.ops.generalized_delta_rule.dplr import chunk_A_fwd, wy_fast_fwd

    A_ab, A_qk, A_ak, A_qb, qg, kg, ag, bg = chunk_A_fwd.chunk_dplr_fwd_intra(
        q=r, k=k, a=a, b=b, gi=gi, ge=ge, scale=1.0, chunk_size=chunk_size, safe_gate=True)
    w, u, A_ab_inv = wy_fast_fwd.prepare_wy_repr_fwd(ag=ag, A_ab=A_ab, A_ak=A_ak, v=v, cu_seqlens=None,
                                                     chunk_size=chunk_size, safe_gate=True)
    return InChunkTerms(A_qk, A_qb, A_ak, qg, kg, ag, bg, w, A_ab_inv), u


def _forward_state_pass(kg, v, w, u, bg, gi, chunk_size: int):
    """fla's ``chunk_dplr_fwd_h`` (no initial or final state) in ``_state_pass_blocks``' blocks: the state at each
    chunk's start (B, chunks, H, K, V) and the chunks' corrected values (like u)."""
    from fla.ops.generalized_delta_rule.dplr.chunk_h_fwd import chunk_dplr_fwd_kernel_h

    batch, length, heads, key_dim = kg.shape
    value_dim = v.shape[-1]
    sub_chunk, value_block = _state_pass_blocks(batch * heads, key_dim, value_dim, chunk_size, kg.device)
    states = kg.new_empty(batch, -(-length // chunk_size), heads, key_dim, value_dim)
    new_values = torch.empty_like(u)
    chunk_dplr_fwd_kernel_h[(batch * heads * value_dim // value_block,)](
        kg=kg, v=v, w=w, bg=bg, u=u, v_new=new_values, gk=gi, h=states, h0=None, ht=None, cu_seqlens=None,
        chunk_offsets=None, T=length, H=heads, K=key_dim, V=value_dim, BT=chunk_size, BC=sub_chunk, BK=key_dim,
        BV=value_block)
    return states, new_values


def _backward_state_pass(qg, bg, w, gi, d_output, dv, chunk_size: int):
    """fla's ``chunk_dplr_bwd_dhu`` (no initial or final state) in ``_state_pass_blocks``' blocks: the state's
    gradient at each chunk's start and the corrected values' gradient (like dv)."""
    from fla.ops.generalized_delta_rule.dplr.chunk_h_bwd import chunk_dplr_bwd_kernel_dhu

    batch, length, heads, key_dim = qg.shape
    value_dim = d_output.shape[-1]
    sub_chunk, value_block = _state_pass_blocks(batch * heads, key_dim, value_dim, chunk_size, qg.device)
    d_states = qg.new_empty(batch, -(-length // chunk_size), heads, key_dim, value_dim)
    d_new_values = torch.empty_like(dv)  # the kernel writes every row and column
    chunk_dplr_bwd_kernel_dhu[(batch * heads * value_dim // value_block,)](
        qg=qg, bg=bg, w=w, gk=gi, dht=None, dh0=None, do=d_output, dh=d_states, dv=dv, dv2=d_new_values,
        cu_seqlens=None, chunk_offsets=None, T=length, H=heads, K=key_dim, V=value_dim, BT=chunk_size,
        BC=sub_chunk, BK=key_dim, BV=value_block)
    return d_states, d_new_values


def _state_pass_blocks(sequences_heads: int, key_dim: int, value_dim: int, chunk_size: int,
                       device: torch.device) -> tuple[int, int]:
    """(sub-chunk, value columns) per program of the state passes. The sub-chunk is fla's choice for the GPU's
    shared memory. The state passes run one program per sequence, head and block of value columns, each walking
    the chunks in turn, and fla takes a head's 64 value columns at once on Hopper: 64 programs at the 0.5B plan's
    micro-batch and 32 at 1.5B's, on a GPU of 132 multiprocessors. The state's columns evolve independently
    (every product in these kernels sums over keys or tokens), so narrower blocks give the same numbers with
    more programs in flight: halved down to ``_NARROWEST_VALUE_BLOCK`` until they fill the multiprocessors."""
    from fla.utils import check_shared_mem

    if key_dim & (key_dim - 1) or not 16 <= key_dim <= 128:
        raise ValueError(f"the state passes take a power-of-two head size from 16 to 128, got {key_dim}")
    if check_shared_mem("hopper", device.index):
        sub_chunk, value_block = 64, 64
    elif check_shared_mem("ampere", device.index):
        sub_chunk, value_block = 32, 32
    else:
        sub_chunk, value_block = 16, 16
    value_block = min(value_block, value_dim)
    multiprocessors = _multiprocessors(device)
    while value_block > _NARROWEST_VALUE_BLOCK and sequences_heads * value_dim // value_block < multiprocessors:
        value_block //= 2
    return min(sub_chunk, chunk_size), value_block


#: The narrowest block of value columns the state passes take: Triton's matrix products need 16.
_NARROWEST_VALUE_BLOCK = 16


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _chunk_size() -> int:
    """What ``chunk_rwkv7`` chooses when told the decay's bound: 64 tokens, 16 where Triton is older than 3.4."""
    from fla.ops.generalized_delta_rule.dplr.chunk import gate_bound_is_safe
    from fla.utils import TRITON_ABOVE_3_4_0

    return 64 if TRITON_ABOVE_3_4_0 and gate_bound_is_safe(LOG_DECAY_LOWER_BOUND, 64) else 16


@torch.compiler.disable  # Triton kernels behind an autograd.Function: dynamo must not trace into them
def wkv7_fla(r, w, k, v, a, b, keep_in_chunk_terms: bool = False):
    """The chunked Triton kernels; same arguments and result as ``wkv7_reference`` (without the state).
    ``keep_in_chunk_terms``: see ``ChunkWKV7`` (with fla 0.6.0 only)."""
    fla_kernel_choice()  # the first import of fla pins its kernel configurations
    if keeps_chunk_states():
        return ChunkWKV7.apply(r, w, k, v, a, b, keep_in_chunk_terms)
    from fla.ops.rwkv7 import chunk_rwkv7

    output, _ = chunk_rwkv7(r, w, k, v, a, b, scale=1.0, safe_gate=True, lower_bound=LOG_DECAY_LOWER_BOUND)
    return output
