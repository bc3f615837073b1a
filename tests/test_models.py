"""Every family: tiny shapes learn, counts match the docs, reference paths match recurrences and kernels."""

import copy
import importlib.util
import math
import re
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import gated_deltanet.model as gated_deltanet_model
import gated_deltanet.short_conv as short_conv_module
import mamba.model as mamba_model
import mamba2.model as mamba2_model
import rwkv.model as rwkv_model
import rwkv.wkv7 as wkv7
from gated_deltanet.delta_rule import gated_delta_rule_reference
from gated_deltanet.short_conv import short_conv_fla, short_conv_reference
from mamba2.ssd import ssd_scan
from rwkv.wkv7 import wkv7_reference
from training_harness.lm import add_product, linear_cross_entropy, matmul_params, softmax_cross_entropy_grad
from training_harness.registry import FAMILY_MODULES, PAPER_FAMILIES, count_on_meta, get_family, resolve_families

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 256


def relative_error(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


@pytest.mark.parametrize("name", sorted(FAMILY_MODULES))
def test_tiny_model_learns_one_batch(name):
    torch.manual_seed(0)
    family = get_family(name)
    model = family.build(family.shape("0.5B", "tiny"), VOCAB, "cpu", False)
    tokens = torch.randint(0, VOCAB, (2, 33))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    logits = model(inputs)
    assert logits.shape == (2, 32, VOCAB)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss = model(inputs, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("name", sorted(FAMILY_MODULES))
def test_training_forward_draws_no_random_numbers(name):
    """What lets recomputed blocks skip saving the RNG state under --cuda_graphs (trainer.recompute_blocks)."""
    torch.manual_seed(0)
    family = get_family(name)
    model = family.build(family.shape("0.5B", "tiny"), VOCAB, "cpu", False).train()
    tokens = torch.randint(0, VOCAB, (2, 33))
    losses = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        losses.append(model(tokens[:, :-1], tokens[:, 1:]))
    assert torch.equal(*losses)


@pytest.mark.parametrize("name", ["qwen", "pythia"])
def test_transformers_attention_is_sdpa_causal_without_a_mask_even_during_a_graph_capture(name, monkeypatch):
    """Some transformers releases build a full (T, T) mask while a CUDA graph captures, which a replay would
    then use; the backbone's attention must be SDPA's causal path either way, equal to the library's own."""
    torch.manual_seed(0)
    family = get_family(name)
    model = family.build(family.shape("0.5B", "tiny"), VOCAB, "cpu", False)
    library = copy.deepcopy(model.backbone.model)
    library.set_attn_implementation("sdpa")
    tokens = torch.randint(0, VOCAB, (2, 32))
    expected = library(input_ids=tokens, use_cache=False).last_hidden_state
    sdpa = F.scaled_dot_product_attention
    calls = []

    def recording_sdpa(*args, **kwargs):
        calls.append((kwargs.get("attn_mask"), kwargs.get("is_causal")))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    monkeypatch.setattr(F, "scaled_dot_product_attention", recording_sdpa)
    hidden = model.backbone(tokens)
    assert calls == [(None, True)] * len(model.blocks)
    torch.testing.assert_close(hidden, expected)


def test_paper_counts_match_docs():
    table = (ROOT / "docs" / "models.md").read_text().split("## `matched`")[0]
    documented = {(m[0], m[1]): int(m[2].replace(",", ""))
                  for m in re.findall(r"^\| (\w+) \| ([\d.]+B) \| ([\d,]+) \|", table, re.M)}
    assert len(documented) == 3 * len(FAMILY_MODULES)
    for (name, size), params in documented.items():
        counted = count_on_meta(get_family(name), size, "paper")
        assert counted["params"] == params, (name, size)


def test_matched_preset_is_within_ten_percent():
    for name in FAMILY_MODULES:
        for size in ("0.5B", "1.5B", "3B"):
            counted = count_on_meta(get_family(name), size, "matched")
            assert abs(counted["params"] / (float(size[:-1]) * 1e9) - 1) <= 0.10, (name, size)


def test_vocabulary_rows_are_padded_to_64():
    assert get_family("pythia").vocab_rows(50_277, "paper") == 50_304
    assert get_family("qwen").vocab_rows(151_665, "paper") == 151_936
    assert get_family("qwen").vocab_rows(384, "tiny") == 384


def test_linear_cross_entropy_equals_the_full_logits_loss():
    hidden = torch.randn(3, 50, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(97, 16, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 97, (3, 50))
    loss = linear_cross_entropy(hidden, weight, labels, chunk_tokens=32)  # chunks of 32 and 18 tokens
    ref = F.cross_entropy((hidden @ weight.t()).reshape(-1, 97), labels.reshape(-1))
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    with torch.no_grad():  # the evaluation path: loss only
        assert linear_cross_entropy(hidden, weight, labels, chunk_tokens=32).item() == pytest.approx(ref.item())
    grads = torch.autograd.grad(3.0 * loss, (hidden, weight))  # a scaled loss scales the gradients
    ref_grads = torch.autograd.grad(3.0 * ref, (hidden, weight))
    for got, want in zip(grads, ref_grads):
        assert torch.allclose(got, want, atol=1e-12)


def test_linear_cross_entropy_under_autocast_keeps_a_float32_weight_gradient():
    hidden = torch.randn(64, 32, requires_grad=True)
    weight = torch.randn(300, 32, requires_grad=True)
    labels = torch.randint(0, 300, (64,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, labels, chunk_tokens=16)
    loss.backward()
    exact_weight = weight.detach().double().requires_grad_()
    ref = F.cross_entropy(hidden.detach().double() @ exact_weight.t(), labels)
    ref.backward()
    assert loss.dtype == weight.grad.dtype == hidden.grad.dtype == torch.float32
    assert loss.item() == pytest.approx(ref.item(), rel=2e-2)  # bf16 products
    error = (weight.grad.double() - exact_weight.grad).norm() / exact_weight.grad.norm()
    assert error < 2e-2


def test_add_product_starts_a_float32_sum_and_adds_into_it():
    left, right = torch.randn(4, 6).to(torch.bfloat16), torch.randn(6, 5).to(torch.bfloat16)
    total = add_product(None, left, right)
    assert total.dtype == torch.float32 and torch.equal(total, (left @ right).float())
    assert add_product(total, left, right) is total  # in place: no new sum per chunk
    assert torch.equal(total, (left @ right).float() + (left @ right))


def wkv7_official_layout(r, w, k, v, a, b):
    """Token by token, head by head, with the (V, K) state of the official RWKV-7 code:
    state = state * exp(w) + state @ (a^T b) + v^T k;  out = state @ r."""
    batch, length, heads, size = r.shape
    out = torch.zeros(batch, length, heads, size, dtype=torch.float64)
    for n in range(batch):
        for h in range(heads):
            state = torch.zeros(size, size, dtype=torch.float64)
            for t in range(length):
                ab = torch.outer(a[n, t, h], b[n, t, h])
                vk = torch.outer(v[n, t, h], k[n, t, h])
                state = state * torch.exp(w[n, t, h]).view(1, -1) + state @ ab + vk
                out[n, t, h] = state @ r[n, t, h]
    return out


def test_rwkv_reference_matches_token_by_token_recurrence():
    torch.manual_seed(1)
    shape = (2, 63, 3, 8)  # odd length
    r, k, v = (torch.randn(shape, dtype=torch.float64) for _ in range(3))
    w = -math.exp(-0.5) * torch.rand(shape, dtype=torch.float64)
    kk = F.normalize(torch.randn(shape, dtype=torch.float64), dim=-1)
    iclr = torch.rand(shape, dtype=torch.float64)
    out, state = wkv7_reference(r, w, k, v, -kk, kk * iclr)
    ref = wkv7_official_layout(r, w, k, v, -kk, kk * iclr)
    assert relative_error(out, ref) < 1e-6
    assert state.shape == (2, 3, 8, 8)


def mamba_token_by_token(mixer, hidden):
    """The mixer as at inference: a rolling conv window and an SSM state, one token at a time."""
    batch, length, _ = hidden.shape
    d_inner, rank = mixer.d_inner, mixer.dt_rank
    A = -torch.exp(mixer.A_log.double())
    conv_window = torch.zeros(batch, d_inner, mamba_model.D_CONV, dtype=torch.float64)
    state = torch.zeros(batch, d_inner, mamba_model.D_STATE, dtype=torch.float64)
    weight = mixer.conv1d.weight.double().squeeze(1)  # (E, K)
    outputs = []
    for t in range(length):
        x, z = (hidden[:, t].double() @ mixer.in_proj.weight.double().t()).chunk(2, dim=-1)
        conv_window = torch.cat([conv_window[:, :, 1:], x.unsqueeze(-1)], dim=-1)
        x = F.silu((conv_window * weight).sum(-1) + mixer.conv1d.bias.double())
        projected = x @ mixer.x_proj.weight.double().t()
        dt, B, C = projected.split([rank, mamba_model.D_STATE, mamba_model.D_STATE], dim=-1)
        delta = F.softplus(dt @ mixer.dt_proj.weight.double().t() + mixer.dt_proj.bias.double())
        state = torch.exp(delta.unsqueeze(-1) * A) * state + (delta * x).unsqueeze(-1) * B.unsqueeze(1)
        y = (state * C.unsqueeze(1)).sum(-1) + mixer.D.double() * x
        outputs.append((y * F.silu(z)) @ mixer.out_proj.weight.double().t())
    return torch.stack(outputs, dim=1)


def test_mamba_reference_matches_token_by_token_scan():
    torch.manual_seed(2)
    mixer = mamba_model.MambaMixer(d_model=32, fused=False)
    hidden = torch.randn(2, 37, 32)
    out = mixer(hidden)
    assert relative_error(out.double(), mamba_token_by_token(mixer, hidden)) < 1e-5


def ssd_quadratic(x, dt, A, B, C, D):
    """The SSD layer in its dual, attention-like form (Dao & Gu 2024, Sec. 3): y_t = sum over s <= t of
    (C_t . B_s) exp(sum_{r=s+1..t} dt_r A) dt_s x_s, plus D x_t; an independent check of the recurrence."""
    heads, groups = x.shape[2], B.shape[2]
    B, C = (m.repeat_interleave(heads // groups, dim=2).double() for m in (B, C))
    log_decay = torch.cumsum(dt.double() * A.double(), dim=1)  # (B, L, H)
    segment = log_decay[:, :, None, :] - log_decay[:, None, :, :]  # (B, t, s, H)
    causal = torch.tril(torch.ones(x.shape[1], x.shape[1], dtype=torch.bool))[None, :, :, None]
    weights = torch.where(causal, torch.exp(segment.masked_fill(~causal, 0.0)), 0.0)
    scores = torch.einsum("bthn,bshn->btsh", C, B) * weights * dt.double()[:, None]
    return torch.einsum("btsh,bshp->bthp", scores, x.double()) + D.double()[:, None] * x.double()


def test_mamba2_recurrence_matches_the_quadratic_dual_form():
    torch.manual_seed(5)
    batch, length, heads, headdim, groups, d_state = 2, 29, 4, 8, 2, 6
    x = torch.randn(batch, length, heads, headdim)
    dt = F.softplus(torch.randn(batch, length, heads))
    A = -torch.rand(heads) * 2
    B, C = torch.randn(batch, length, groups, d_state), torch.randn(batch, length, groups, d_state)
    D = torch.randn(heads)
    assert relative_error(ssd_scan(x, dt, A, B, C, D).double(), ssd_quadratic(x, dt, A, B, C, D)) < 1e-5


def delta_rule_by_matrices(q, k, v, a, b, A_log, dt_bias):
    """The gated delta rule written with explicit matrices, S_t = alpha_t (I - beta_t k k^T) S_{t-1} +
    beta_t k v^T, o_t = S_t^T q_t (Yang et al. 2024, eq. 10), in float64: an independent check."""
    q = F.normalize(q.double(), dim=-1) * q.shape[-1] ** -0.5
    k = F.normalize(k.double(), dim=-1)
    alpha = torch.exp(-torch.exp(A_log.double()) * F.softplus(a.double() + dt_bias.double()))
    beta = torch.sigmoid(b.double())
    batch, length, heads, key = k.shape
    state = torch.zeros(batch, heads, key, v.shape[-1], dtype=torch.float64)
    identity = torch.eye(key, dtype=torch.float64)
    outputs = []
    for t in range(length):
        erase = identity - beta[:, t, :, None, None] * k[:, t, :, :, None] * k[:, t, :, None, :]
        write = beta[:, t, :, None, None] * k[:, t, :, :, None] * v[:, t].double()[:, :, None, :]
        state = alpha[:, t, :, None, None] * erase @ state + write
        outputs.append((state.transpose(-1, -2) @ q[:, t, :, :, None]).squeeze(-1))
    return torch.stack(outputs, dim=1)


def test_gated_delta_rule_reference_matches_the_matrix_form():
    torch.manual_seed(7)
    batch, length, heads, key, value = 2, 23, 3, 8, 16
    q, k = torch.randn(batch, length, heads, key), torch.randn(batch, length, heads, key)
    v, a, b = torch.randn(batch, length, heads, value), torch.randn(batch, length, heads), torch.randn(
        batch, length, heads)
    A_log, dt_bias = torch.randn(heads), torch.randn(heads)
    out = gated_delta_rule_reference(q, k, v, a, b, A_log, dt_bias)
    assert relative_error(out.double(), delta_rule_by_matrices(q, k, v, a, b, A_log, dt_bias)) < 1e-5


def test_the_delta_rule_overwrites_what_a_key_stored():
    """With no decay and full update rate, writing under a key replaces its value (linear attention would
    add the two): reading with that key returns the last value written, scaled by 1/sqrt(K)."""
    key_size = 4
    keys = torch.eye(key_size)[[0, 1, 0]]  # key 0, key 1, key 0 again
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    q = torch.eye(key_size)[[0, 1, 0]]
    out = gated_delta_rule_reference(q[None, :, None], keys[None, :, None], values[None, :, None],
                                     torch.zeros(1, 3, 1), torch.full((1, 3, 1), 30.0), torch.tensor([-30.0]),
                                     torch.zeros(1))
    read = out[0, :, 0] * key_size ** 0.5
    assert torch.allclose(read[0], values[0], atol=1e-4) and torch.allclose(read[1], values[1], atol=1e-4)
    assert torch.allclose(read[2], values[2], atol=1e-4)  # overwritten, not values[0] + values[2]


def test_beyond_the_paper_families_join_only_when_named():
    assert resolve_families("paper") == list(PAPER_FAMILIES) and "mamba2" not in PAPER_FAMILIES
    assert "mamba2" in resolve_families("all") and resolve_families("mamba,mamba2") == ["mamba", "mamba2"]
    with pytest.raises(ValueError, match="unknown families"):
        resolve_families("mamba3")


def test_cuda_without_fused_kernels_refuses(monkeypatch):
    monkeypatch.setattr(mamba_model, "fused_kernels_available", lambda: False)
    with pytest.raises(RuntimeError, match="--allow_slow_kernels"):
        mamba_model.build(mamba_model.SHAPES["tiny"]["0.5B"], VOCAB, "cuda", allow_slow_kernels=False)
    slow = mamba_model.build(mamba_model.SHAPES["tiny"]["0.5B"], VOCAB, "cuda", allow_slow_kernels=True)
    assert slow.kernel_path == mamba_model.REFERENCE_PATH
    monkeypatch.setattr(rwkv_model, "fla_available", lambda: False)
    with pytest.raises(RuntimeError, match="flash-linear-attention"):
        rwkv_model.build(rwkv_model.SHAPES["tiny"]["0.5B"], VOCAB, "cuda", allow_slow_kernels=False)


@pytest.mark.parametrize("version, kept", [("0.6.0", True), ("0.6.1", False), ("0.7.0", False)])
def test_rwkv_keeps_chunk_states_only_with_the_fla_release_whose_internals_it_calls(monkeypatch, version, kept):
    monkeypatch.setitem(sys.modules, "fla", types.SimpleNamespace(__version__=version))
    assert wkv7.keeps_chunk_states() is kept
    path = wkv7.fla_path()
    assert ("chunk states kept for the backward" in path) is kept
    assert (f"fla {version}'s chunk_rwkv7" in path) is not kept


def fake_fla(monkeypatch, hopper: bool, triton_version: str, tilelang: bool) -> None:
    """fla's version flags and triton's version as fla 0.6 computes them, and whether tilelang is installed."""
    below = triton_version.split(".") < ["3", "7", "1"]
    utils = types.SimpleNamespace(IS_NVIDIA_HOPPER=hopper, TRITON_ABOVE_3_4_0=True, TRITON_ABOVE_3_7_1=not below)
    monkeypatch.setitem(sys.modules, "fla", types.SimpleNamespace(utils=utils))
    monkeypatch.setitem(sys.modules, "fla.utils", utils)
    monkeypatch.setitem(sys.modules, "triton", types.SimpleNamespace(__version__=triton_version))
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: object() if tilelang and name == "tilelang" else find_spec(name, *args))


def test_gated_deltanet_short_convolution_is_the_causal_depthwise_conv1d():
    torch.manual_seed(0)
    conv = torch.nn.Conv1d(6, 6, 4, groups=6, padding=3, bias=False)
    x = torch.randn(2, 11, 6, requires_grad=True)
    out = short_conv_reference(x, conv.weight.squeeze(1))
    expected = F.silu(conv(x.transpose(1, 2))[..., :11].transpose(1, 2))  # causal: the first T outputs
    assert torch.allclose(out, expected, atol=1e-6)
    grads = torch.autograd.grad(out.square().sum(), (x, conv.weight))
    expected_grads = torch.autograd.grad(expected.square().sum(), (x, conv.weight))
    assert all(torch.allclose(g, e, atol=1e-5) for g, e in zip(grads, expected_grads))
    x2 = x.detach().clone()
    x2[:, 5:] += 1.0  # a later token never reaches an earlier output
    assert torch.equal(short_conv_reference(x2, conv.weight.squeeze(1))[:, :5], out[:, :5])


def fake_fla_causal_conv(monkeypatch, calls: list) -> None:
    """fla's causal_conv1d forward and backward as plain PyTorch, to test the custom op's wiring on CPU."""
    def forward(x, weight, bias, residual, activation):
        calls.append("forward")
        return short_conv_reference(x, weight), None

    def backward(x, dy, dht, weight, bias, residual, activation):
        calls.append("backward")
        taps, length = weight.shape[-1], x.shape[1]
        padded = F.pad(x, (0, 0, taps - 1, 0))
        z = sum(padded[:, j:j + length] * weight[:, j] for j in range(taps))
        dz = dy * torch.sigmoid(z) * (1 + z * (1 - torch.sigmoid(z)))  # silu'(z)
        dpadded = torch.zeros_like(padded)
        for j in range(taps):
            dpadded[:, j:j + length] += dz * weight[:, j]
        dweight = torch.stack([(dz * padded[:, j:j + length]).sum((0, 1)) for j in range(taps)], -1)
        return dpadded[:, taps - 1:], dweight, None, None, None

    ops = types.ModuleType("fla.modules.causal_conv1d.ops")
    ops.causal_conv1d_fwd, ops.causal_conv1d_bwd = forward, backward
    monkeypatch.setitem(sys.modules, "fla.modules.causal_conv1d.ops", ops)
    monkeypatch.setattr(short_conv_module, "fla_kernel_choice", lambda: None)


def test_gated_deltanet_short_conv_op_compiles_into_one_graph_with_its_backward(monkeypatch):
    """The kernel's custom op inside a fullgraph compiled region, forward and backward through fla's entry
    points (here plain PyTorch; the GPU test compares the real kernel with the reference)."""
    calls = []
    fake_fla_causal_conv(monkeypatch, calls)
    torch.manual_seed(0)
    x, weight = torch.randn(2, 9, 6, requires_grad=True), torch.randn(6, 4, requires_grad=True)
    region = torch.compile(lambda x, w: short_conv_fla(2 * x, w).sum(-1), fullgraph=True, backend="aot_eager")
    out = region(x, weight)
    grads = torch.autograd.grad(out.square().sum(), (x, weight))
    expected = short_conv_reference(2 * x, weight).sum(-1)
    expected_grads = torch.autograd.grad(expected.square().sum(), (x, weight))
    assert calls == ["forward", "backward"]
    assert torch.allclose(out, expected, atol=1e-6)
    assert all(torch.allclose(g, e, atol=1e-5) for g, e in zip(grads, expected_grads))


def test_gated_deltanet_stops_at_once_where_fla_would_refuse_its_backward(monkeypatch):
    fake_fla(monkeypatch, hopper=True, triton_version="3.6.0", tilelang=False)
    assert "3.6.0" in gated_deltanet_model.backward_refused() and "#640" in gated_deltanet_model.backward_refused()
    monkeypatch.setattr(gated_deltanet_model, "fused_kernels_available", lambda: True)
    shape = gated_deltanet_model.SHAPES["tiny"]["0.5B"]
    with pytest.raises(RuntimeError, match="#640.*--allow_slow_kernels"):
        gated_deltanet_model.build(shape, VOCAB, "cuda", allow_slow_kernels=False)
    slow = gated_deltanet_model.build(shape, VOCAB, "cuda", allow_slow_kernels=True)
    assert slow.kernel_path == gated_deltanet_model.REFERENCE_PATH


@pytest.mark.parametrize("hopper, triton_version, tilelang", [(False, "3.6.0", False), (True, "3.7.1", False),
                                                              (True, "3.6.0", True)])
def test_gated_deltanet_runs_where_fla_accepts_its_backward(monkeypatch, hopper, triton_version, tilelang):
    fake_fla(monkeypatch, hopper=hopper, triton_version=triton_version, tilelang=tilelang)
    assert gated_deltanet_model.backward_refused() is None


def test_flops_per_token_counts_matmuls_and_mixing():
    family = get_family("qwen")
    counted = count_on_meta(family, "0.5B", "paper", 151_665, seq_len=8192)
    non_embedding = 24 * (896 * 896 * 2 + 896 * 128 * 2 + 3 * 896 * 4864)  # q, o, k, v, MLP weights
    expected = 6 * (non_embedding + 151_936 * 896) + 6 * 24 * 8192 * 896
    assert counted["flops_per_token"] == pytest.approx(expected)
    assert math.isclose(counted["flops_per_token"] / 1e9, 4.0207, rel_tol=1e-4)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def wkv7_kernel_inputs(seed: int) -> list[torch.Tensor]:
    """(r, w, k, v, a, b) as RWKV-7 makes them, bf16 leaves on the GPU: 1000 tokens, which end mid-chunk."""
    torch.manual_seed(seed)
    shape = (2, 1000, 4, 64)
    r, k, v = (torch.randn(shape, device="cuda") for _ in range(3))
    w = -math.exp(-0.5) * torch.rand(shape, device="cuda")
    kk = F.normalize(torch.randn(shape, device="cuda"), dim=-1)
    iclr = torch.rand(shape, device="cuda")
    return [t.to(torch.bfloat16).requires_grad_() for t in (r, w, k, v, -kk, kk * iclr)]


@cuda
@pytest.mark.gpu
def test_rwkv_fla_kernel_matches_reference_with_gradients():
    from rwkv.wkv7 import wkv7_fla

    inputs = wkv7_kernel_inputs(seed=3)
    reference = [t.detach().float().requires_grad_() for t in inputs]
    out = wkv7_fla(*inputs)
    ref, _ = wkv7_reference(*reference)
    assert relative_error(out, ref) < 2e-2
    grad = torch.randn_like(ref)
    out.backward(grad.to(out.dtype))
    ref.backward(grad)
    for got, want in zip(inputs, reference):
        assert relative_error(got.grad, want.grad) < 5e-2


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("value_block,multiprocessors,keep_in_chunk_terms",
                         [(64, 1, False), (32, 16, False), (16, 1000, False), (16, 1000, True)])
def test_rwkv_kernel_with_kept_chunk_states_matches_fla_recomputing_them(monkeypatch, value_block, multiprocessors,
                                                                        keep_in_chunk_terms):
    """The same kernels on the same inputs: the backward's states, kept from the forward or recomputed by fla's
    own chunk_rwkv7, must give the same output and gradients (a length that ends mid-chunk included), with the
    state passes in fla's blocks of 64 value columns or in narrower ones, and with the in-chunk terms kept."""
    from fla.ops.rwkv7 import chunk_rwkv7

    from rwkv.wkv7 import LOG_DECAY_LOWER_BOUND, wkv7_fla

    if not wkv7.keeps_chunk_states():
        pytest.skip(f"ChunkWKV7 runs with flash-linear-attention {wkv7.CHUNK_STATES_FLA_VERSION} only")
    monkeypatch.setattr(wkv7, "_multiprocessors", lambda device: multiprocessors)
    ours = wkv7_kernel_inputs(seed=4)  # 2 sequences x 4 heads: 8 programs in blocks of 64 columns
    assert wkv7._state_pass_blocks(8, 64, 64, 64, ours[0].device) == (64, value_block)
    fla = [t.detach().clone().requires_grad_() for t in ours]
    out = wkv7_fla(*ours, keep_in_chunk_terms=keep_in_chunk_terms)
    want, _ = chunk_rwkv7(*fla, scale=1.0, safe_gate=True, lower_bound=LOG_DECAY_LOWER_BOUND)
    assert torch.equal(out, want)
    grad = torch.randn_like(out)
    out.backward(grad)
    want.backward(grad)
    for got, expected in zip(ours, fla):
        assert relative_error(got.grad, expected.grad) < 1e-3


@cuda
@pytest.mark.gpu
def test_rwkv_runs_fla_chunk_rwkv7_with_another_fla_release(monkeypatch):
    """With an fla release other than the one ChunkWKV7 was written against, the model warns, names fla's
    chunk_rwkv7 in its kernel path, and runs it: its output and gradients, not ChunkWKV7's."""
    import fla
    from fla.ops.rwkv7 import chunk_rwkv7

    def refuse(*inputs):
        raise AssertionError("ChunkWKV7 ran with an fla release it was not written against")

    monkeypatch.setattr(fla, "__version__", "0.7.0")
    monkeypatch.setattr(wkv7.ChunkWKV7, "apply", refuse)
    with pytest.warns(UserWarning, match="runs fla's chunk_rwkv7"):
        model = rwkv_model.build(rwkv_model.SHAPES["tiny"]["0.5B"], VOCAB, "cuda", allow_slow_kernels=False)
    assert "fla 0.7.0's chunk_rwkv7" in model.kernel_path
    ours = wkv7_kernel_inputs(seed=5)
    theirs = [t.detach().clone().requires_grad_() for t in ours]
    out = wkv7.wkv7_fla(*ours)
    want, _ = chunk_rwkv7(*theirs, scale=1.0, safe_gate=True, lower_bound=wkv7.LOG_DECAY_LOWER_BOUND)
    assert torch.equal(out, want)
    grad = torch.randn_like(out)
    out.backward(grad)
    want.backward(grad)
    for got, expected in zip(ours, theirs):
        assert torch.equal(got.grad, expected.grad)


def assert_kernel_matches_reference(make_mixer, length: int) -> None:
    """A mixer on its kernels under bf16 autocast against the same weights on the float32 reference path:
    outputs within 2 %, every parameter's gradient within 5 %."""
    fused, plain = make_mixer(True).cuda(), make_mixer(False).cuda()
    plain.load_state_dict(fused.state_dict())
    hidden = torch.randn(2, length, 256, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = fused(hidden)
    ref = plain(hidden)
    assert relative_error(out, ref) < 2e-2
    out.float().sum().backward()
    ref.sum().backward()
    for (name, p), q in zip(fused.named_parameters(), plain.parameters()):
        assert relative_error(p.grad, q.grad) < 5e-2, name


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("length", [257, 2600])  # padded to 264; three of the scan's chunks, the last partial
def test_mamba_fused_kernels_match_reference_with_gradients(length):
    if not mamba_model.fused_kernels_available():
        pytest.skip("mamba-ssm not installed")
    torch.manual_seed(4)
    assert_kernel_matches_reference(lambda fused: mamba_model.MambaMixer(d_model=256, fused=fused), length)


def test_scan_tiling_clusters_divide_the_channels():
    """The backward's grid of channels splits into whole clusters: the largest power of two up to the tiling's."""
    from mamba.scan_kernel import ScanTiling

    tiling = ScanTiling(cluster=8)
    assert [tiling.cluster_size(channels) for channels in (3072, 5120, 100, 6, 7)] == [8, 8, 4, 2, 1]
    assert ScanTiling(cluster=4).cluster_size(3072) == 4
    assert tiling.chunk == 1024 and tiling.backward_shared_bytes() == 3 * 2 * 2 * 1024 * 4
    assert [tiling.chunks(length) for length in (8, 1024, 1032, 8192)] == [1, 1, 2, 8]


def test_scan_tiling_forward_splits_the_backward_chunk_among_its_own_threads():
    """The forward's chunks are the backward's (it keeps their final states for it), in blocks of their own."""
    from mamba.scan_kernel import ScanTiling

    assert (ScanTiling().forward_block, ScanTiling().forward_steps_per_thread) == (128, 8)
    split = ScanTiling(threads=128, steps_per_thread=8, forward_threads=64)
    assert (split.chunk, split.forward_block, split.forward_steps_per_thread) == (1024, 64, 16)
    assert split.forward_kernel == ScanTiling(threads=64, steps_per_thread=16)  # compiled on its own
    assert ScanTiling().forward_kernel == ScanTiling()  # unsplit: both kernels compiled in the same tiling
    for threads in (48, 256, 2048):  # not whole warps; 4 steps a thread; no step at all
        with pytest.raises(ValueError, match="cannot split a chunk of 1024"):
            ScanTiling(threads=128, steps_per_thread=8, forward_threads=threads)


@pytest.mark.parametrize("length", [0, 12])
def test_scan_kernel_refuses_lengths_it_cannot_read_eight_at_a_time(length):
    """Checked before any kernel is compiled or launched (mamba_fused pads other lengths to a multiple of 8)."""
    from mamba.scan_kernel import scan_forward

    batch, channels, d_state = 1, 8, 4
    u = torch.zeros(batch, channels, length, dtype=torch.bfloat16)
    B = torch.zeros(batch, d_state, length, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="divisible by 8"):
        scan_forward(u, u, torch.zeros(channels, d_state), B, B, torch.zeros(channels), u, torch.zeros(channels))


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("tiling", [{}, {"cluster": 8}, {"threads": 64}, {"threads": 256, "states_per_sum": 1},
                                    {"forward_threads": 64},
                                    {"forward_threads": 128, "threads": 64, "steps_per_thread": 16}],
                         ids=["128 threads both", "cluster 8", "64 threads", "256 threads, one state per sum",
                              "shipped: forward in 64 threads", "forward in 128 threads, backward in 64"])
def test_mamba_scan_kernel_matches_mamba_ssm(tiling):
    """The harness's selective scan against mamba-ssm's selective_scan_cuda on the same bf16 inputs: every output
    and gradient (dB and dC summed over channels by thread-block clusters) within bf16 rounding of each other, in
    the shipped tiling and in others that scripts/benchmark_selective_scan.py times."""
    if not mamba_model.fused_kernels_available():
        pytest.skip("mamba-ssm not installed")
    import selective_scan_cuda

    from mamba.scan_kernel import ScanTiling, scan_backward, scan_forward

    tiling = ScanTiling(**tiling)

    torch.manual_seed(5)
    batch, channels, length, d_state = 2, 64, 2600, mamba_model.D_STATE

    def bf16(*shape):
        return torch.randn(*shape, device="cuda").to(torch.bfloat16)

    u, delta, z, dout = bf16(batch, channels, length), bf16(batch, channels, length) * 0.5 - 1, \
        bf16(batch, channels, length), bf16(batch, channels, length)
    B, C = bf16(batch, d_state, length), bf16(batch, d_state, length)
    A = -torch.rand(channels, d_state, device="cuda") * d_state - 0.5
    D, delta_bias = torch.randn(channels, device="cuda"), 0.3 * torch.randn(channels, device="cuda")
    out, out_z, states = scan_forward(u, delta, A, B, C, D, z, delta_bias, tiling=tiling)
    dz = torch.empty_like(z)
    ours = (out, out_z, *scan_backward(u, delta, A, B, C, D, z, delta_bias, dout, states, out, dz, tiling=tiling), dz)
    args = (u, delta, A, B[:, None], C[:, None], D, z, delta_bias)
    theirs_out, theirs_states, theirs_out_z = selective_scan_cuda.fwd(*args, True)
    du, ddelta, dA, dB, dC, dD, ddelta_bias, theirs_dz, theirs_out_z_again = selective_scan_cuda.bwd(
        *args, dout, theirs_states, theirs_out, None, True, True)
    theirs = (theirs_out, theirs_out_z, du, ddelta, dA, dB[:, 0], dC[:, 0], dD, ddelta_bias, theirs_out_z_again,
              theirs_dz)
    names = ("out", "out_z", "du", "ddelta", "dA", "dB", "dC", "dD", "ddelta_bias", "out_z (backward)", "dz")
    for name, got, want in zip(names, ours, theirs):
        assert got.shape == want.shape, name
        assert relative_error(got.float(), want.float()) < 1e-2, name


@cuda
@pytest.mark.gpu
def test_mamba2_fused_kernels_match_reference_with_gradients():
    if not mamba2_model.fused_kernels_available():
        pytest.skip("mamba-ssm not installed")
    torch.manual_seed(6)  # 301: not a multiple of the chunk length
    assert_kernel_matches_reference(lambda fused: mamba2_model.Mamba2Mixer(d_model=256, fused=fused), 301)


@cuda
@pytest.mark.gpu
def test_gated_deltanet_fla_kernel_matches_reference_with_gradients():
    if not gated_deltanet_model.fused_kernels_available():
        pytest.skip("flash-linear-attention not installed")
    refused = gated_deltanet_model.backward_refused()
    if refused:
        pytest.skip(refused)
    torch.manual_seed(8)  # 201: not a multiple of the chunk length
    assert_kernel_matches_reference(
        lambda fused: gated_deltanet_model.GatedDeltaNetMixer(d_model=256, heads=2, head_dim=64, fused=fused), 201)


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cross_entropy_kernel_matches_the_reference(dtype):
    from training_harness.cross_entropy_kernel import softmax_cross_entropy_grad_

    torch.manual_seed(9)  # 50,281 columns: not a multiple of the kernel's tile
    logits = (4 * torch.randn(37, 50_281, device="cuda")).to(dtype)
    labels = torch.randint(50_281, (37,), device="cuda")
    ref_loss, ref_grad = softmax_cross_entropy_grad(logits, labels)
    loss, grad = softmax_cross_entropy_grad_(logits.clone(), labels)
    assert grad.dtype == dtype and loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    tolerance = 2 ** -8 if dtype == torch.bfloat16 else 1e-5  # bf16: one rounding step below 1
    assert (grad.float() - ref_grad.float()).abs().max().item() <= tolerance
    labels[5] = 50_281  # outside the vocabulary: a NaN loss, not another row's logit
    assert softmax_cross_entropy_grad_(logits.clone(), labels)[0].isnan()


@cuda
@pytest.mark.gpu
def test_linear_cross_entropy_on_cuda_matches_the_reference_path():
    torch.manual_seed(10)
    hidden = torch.randn(2, 700, 64, device="cuda", requires_grad=True)
    weight = torch.randn(1_001, 64, device="cuda", requires_grad=True)
    labels = torch.randint(1_001, (2, 700), device="cuda")
    results = []
    for loss_and_grad in (None, softmax_cross_entropy_grad):  # the kernel (CUDA's default), the reference
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = linear_cross_entropy(hidden, weight, labels, chunk_tokens=512, loss_and_grad=loss_and_grad)
        results.append((loss, *torch.autograd.grad(loss, (hidden, weight))))
    for got, want in zip(*results):
        assert relative_error(got, want) < 1e-2


@cuda
@pytest.mark.gpu
def test_add_product_sums_bf16_products_in_float32_on_the_gpu():
    """As the loss sums its head gradient over chunks (a transposed left factor): closer to float64 than the sum
    of the same products each rounded to bf16 first."""
    torch.manual_seed(11)
    products = [(torch.randn(1024, 300, device="cuda").to(torch.bfloat16).t(),
                 torch.randn(1024, 96, device="cuda").to(torch.bfloat16)) for _ in range(3)]
    total = None
    for left, right in products:
        total = add_product(total, left, right)
    exact = sum(left.double() @ right.double() for left, right in products)
    rounded = sum((left @ right).double() for left, right in products)
    assert total.dtype == torch.float32
    assert relative_error(total.double(), exact) < 1e-5 < relative_error(rounded, exact)


def test_rwkv_flops_count_every_projection_including_the_low_rank_ones():
    d_model, layers, vocab = 128, 2, 256
    model = get_family("rwkv").build({"layers": layers, "d_model": d_model}, vocab, "cpu", False)
    rank = {name: rwkv_model._lora_rank(d_model, *scale) for name, scale in
            {"w": (1.8, 0.5), "a": (1.8, 0.5), "v": (1.3, 0.5), "g": (0.6, 0.8)}.items()}
    time_mix = 4 * d_model * d_model  # receptance, key, value, output
    channel_mix = 2 * d_model * 4 * d_model
    low_rank_first = 2 * d_model * (rank["w"] + rank["a"] + rank["g"])  # layer 0 has no value residual
    low_rank = low_rank_first + 2 * d_model * rank["v"]
    expected = layers * (time_mix + channel_mix) + low_rank_first + (layers - 1) * low_rank + vocab * d_model
    assert matmul_params(model) == expected


def test_torch_workarounds_apply_up_to_the_newest_release_they_were_seen_on():
    from training_harness.torch_workarounds import COMPILE_WORKAROUNDS

    cache = next(w for w in COMPILE_WORKAROUNDS if w.name == "autograd_cache")
    assert cache.needed("2.11.0+cu130") and cache.needed("2.13.0+cpu") and cache.needed("2.9.1")
    assert not cache.needed("2.14.0") and not cache.needed("3.0.0")


@pytest.mark.parametrize("fla_release_keeps", [True, False])
def test_rwkv_blocks_hand_keep_recurrence_terms_to_the_kernel(monkeypatch, fla_release_keeps):
    """``keep_recurrence_terms`` reaches fla's kernel call in every block (the reference stands in for it), and
    warns where the installed fla release cannot keep them."""
    calls = []

    def kernel(r, w, k, v, a, b, keep_in_chunk_terms=False):
        calls.append(keep_in_chunk_terms)
        return wkv7_reference(r, w, k, v, a, b)[0]

    monkeypatch.setattr(rwkv_model, "wkv7_fla", kernel)
    monkeypatch.setattr(rwkv_model, "keeps_chunk_states", lambda: fla_release_keeps)
    model = get_family("rwkv").build(rwkv_model.SHAPES["tiny"]["0.5B"], VOCAB, "cpu", False)
    for block in model.blocks:
        block.att.fused = True
    tokens = torch.randint(0, VOCAB, (1, 8))
    model(tokens, tokens)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.backbone.keep_recurrence_terms()
    assert any("keeps nothing" in str(w.message) for w in caught) is not fla_release_keeps
    model(tokens, tokens)
    assert calls == [False] * len(model.blocks) + [True] * len(model.blocks)
