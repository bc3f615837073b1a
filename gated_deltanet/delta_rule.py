"""The gated delta rule: flash-linear-attention's chunked Triton kernel and a float32 reference.

Both take q, k (B, T, H, K), v (B, T, H, V), the gate and update-rate inputs a, b (B, T, H) before their
activations, and the per-head A_log and dt_bias, and return o (B, T, H, V):

    q, k = l2norm(q), l2norm(k);  g_t = -exp(A_log) softplus(a_t + dt_bias);  beta_t = sigmoid(b_t)
    S_t = exp(g_t) S_{t-1} + beta_t k_t (v_t - exp(g_t) S_{t-1}^T k_t)^T   (K x V);  o_t = S_t^T q_t / sqrt(K)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from training_harness.kernel_pins import kernel_choice

FUSED_PATH = "fla chunk_gated_delta_rule (Triton; gate, beta and q/k norm in the kernel) and causal_conv1d"
REFERENCE_PATH = "PyTorch reference gated delta rule (slow)"


def fla_kernel_choice() -> str | None:
    """How fla's kernels are chosen ("pinned ..." or "autotuned ..."), or None without fla."""
    return kernel_choice("gated_deltanet")


def fused_kernels_available() -> bool:
    return fla_kernel_choice() is not None


def backward_refused() -> str | None:
    """Why fla would refuse this machine's gated backward kernel at the first step, or None: on Hopper with
    Triton 3.4-3.7.0 it computes wrong gradients (fla issue #640), and fla raises unless tilelang can take
    over. Asked before building, so that a run stops in seconds instead of after compiling."""
    import importlib.util

    import fla.utils

    broken = (getattr(fla.utils, "IS_NVIDIA_HOPPER", False) and getattr(fla.utils, "TRITON_ABOVE_3_4_0", False)
              and not getattr(fla.utils, "TRITON_ABOVE_3_7_1", True))
    if not broken or importlib.util.find_spec("tilelang") is not None:
        return None
    import triton

    return (f"fla refuses Gated DeltaNet's backward kernel on Hopper with Triton {triton.__version__} (Triton "
            "3.4-3.7.0 computes wrong gradients there: fla issue #640); install Triton >= 3.7.1 with a torch "
            "built for it, or tilelang")


@torch.compiler.disable  # Triton kernels behind an autograd.Function: run eagerly between compiled regions
def gated_delta_rule_fused(q, k, v, a, b, A_log, dt_bias):
    """fla's chunked kernel with the layer's in-kernel options (GatedDeltaNet's training path), the chunk
    states stored value-major as the layer stores them."""
    fla_kernel_choice()  # the first import of fla pins its kernel configurations
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    out, _ = chunk_gated_delta_rule(q, k, v, g=a, beta=b, use_qk_l2norm_in_kernel=True,
                                    use_beta_sigmoid_in_kernel=True, use_gate_in_kernel=True, A_log=A_log,
                                    dt_bias=dt_bias, state_v_first=True)
    return out


@torch.compiler.disable  # a Python loop over tokens: tracing it would unroll the sequence
def gated_delta_rule_reference(q, k, v, a, b, A_log, dt_bias):
    """The same function as ``gated_delta_rule_fused``, sequential in time, float32; runs anywhere."""
    q = F.normalize(q.float(), dim=-1, eps=1e-6) * q.shape[-1] ** -0.5
    k = F.normalize(k.float(), dim=-1, eps=1e-6)
    v = v.float()
    decay = torch.exp(-torch.exp(A_log.float()) * F.softplus(a.float() + dt_bias.float()))  # (B, T, H)
    beta = torch.sigmoid(b.float())
    state = q.new_zeros(q.shape[0], q.shape[2], q.shape[3], v.shape[3])  # (B, H, K, V)
    outputs = []
    for t in range(q.shape[1]):
        state = decay[:, t, :, None, None] * state
        correction = beta[:, t, :, None] * (v[:, t] - torch.einsum("bhkv,bhk->bhv", state, k[:, t]))
        state = state + k[:, t, :, :, None] * correction[:, :, None, :]
        outputs.append(torch.einsum("bhkv,bhk->bhv", state, q[:, t]))
    return torch.stack(outputs, dim=1)
