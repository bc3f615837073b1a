"""bf16 working weights against autocast's per-micro-batch casts: the same arithmetic, bit for bit."""

import contextlib
import copy

import pytest
import torch

from training_harness.registry import FAMILY_MODULES, build_model, get_family
from training_harness.working_weights import WorkingWeights, matrix_weights, weight_gradient

VOCAB = 64
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def batches(device: str, count: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return [torch.randint(0, VOCAB, (2, 33), generator=generator).to(device) for _ in range(count)]


def train(model, device: str, working: bool, steps: int = 2, micro_batches: int = 2) -> list[torch.Tensor]:
    """The trainer's step: micro-batches under bf16 autocast, clipping, AdamW; each step's float32 gradients as
    clipping and AdamW saw them, and its gradient norm."""
    weights = WorkingWeights(matrix_weights(model)) if working else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, fused=device == "cuda")
    tokens = batches(device, steps * micro_batches)
    seen = []
    for step in range(steps):
        for index in range(micro_batches):
            with torch.autocast(device, dtype=torch.bfloat16):
                loss = model(*split(tokens[step * micro_batches + index]))
            (loss / micro_batches).backward()
        with weights.masters() if weights else contextlib.nullcontext():
            seen += [p.grad.clone() for p in model.parameters()]
            seen.append(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return seen


def split(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return tokens[:, :-1], tokens[:, 1:]


def twins(name: str, device: str):
    """A tiny model of the family on ``device`` and a copy of it; the copy's matrix weights."""
    torch.manual_seed(0)
    model = build_model(get_family(name), "0.5B", "tiny", VOCAB, device, allow_slow_kernels=True)
    twin = copy.deepcopy(model)
    copied = {id(p) for p in matrix_weights(twin)}
    assert copied, "the backbone has matrix weights to copy"
    return model, twin, copied


@pytest.mark.parametrize("name", sorted(FAMILY_MODULES))
def test_working_weights_train_bit_for_bit_as_autocasts_casts_on_cpu(name):
    model, twin, copied = twins(name, "cpu")
    for got, want in zip(train(twin, "cpu", working=True), train(model, "cpu", working=False), strict=True):
        assert torch.equal(got, want)
    for (parameter_name, want), got in zip(model.named_parameters(), twin.parameters(), strict=True):
        # outside masters() the copied weights are their masters rounded to bf16, the rest untouched
        expected = want.to(torch.bfloat16) if id(got) in copied else want
        assert got.dtype == expected.dtype and torch.equal(got, expected), parameter_name


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(FAMILY_MODULES))
def test_working_weights_give_autocasts_gradients_on_the_gpu(name):
    """The families' GPU kernels (mamba-ssm, fla, the loss kernel) take the bf16 copies and return their
    gradients as under autocast's casts (a family whose library is missing runs its reference path). Within
    bf16 rounding rather than bit for bit: some of those kernels add with atomics, in no fixed order."""
    model, twin, _ = twins(name, "cuda")
    got, want = train(twin, "cuda", working=True, steps=1), train(model, "cuda", working=False, steps=1)
    for (parameter_name, _), got_grad, want_grad in zip(model.named_parameters(), got, want):
        error = ((got_grad - want_grad).norm() / want_grad.norm().clamp_min(1e-12)).item()
        assert error < 1e-2, (parameter_name, error)


def test_the_masters_and_their_gradient_sums_are_what_autocast_would_leave():
    layer = torch.nn.Linear(4, 3, bias=False)
    plain = copy.deepcopy(layer)
    master = layer.weight.detach().clone()
    weights = WorkingWeights([layer.weight])
    assert layer.weight.dtype == torch.bfloat16 and torch.equal(layer.weight, master.to(torch.bfloat16))
    inputs = torch.randn(5, 4)
    for index in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            layer(inputs * (index + 1)).sum().backward()
            plain(inputs * (index + 1)).sum().backward()
        assert layer.weight.grad is None  # taken into the float32 sum as soon as it was ready
    with weights.masters():
        assert layer.weight.dtype == torch.float32 and torch.equal(layer.weight, master)
        assert torch.equal(layer.weight.grad, plain.weight.grad)
        layer.weight.data.add_(1.0)  # as an optimizer step would
        layer.weight.grad = None  # as zero_grad would
    assert weights.sums == [None]  # which freed the sum
    assert torch.equal(layer.weight, (master + 1.0).to(torch.bfloat16))  # the copy refreshed from the master


def test_only_float32_weights_have_working_copies():
    with pytest.raises(TypeError, match="float32 master"):
        WorkingWeights([torch.nn.Parameter(torch.zeros(2, 2, dtype=torch.bfloat16))])


def test_weight_gradient_adds_the_product_into_the_sum_of_a_working_weight():
    """A backward of the harness's own returns the product where the weight has no working copy, and where it
    has, adds it into the float32 sum as a gradient that autograd accumulated would be, returning None."""
    plain, working = torch.nn.Parameter(torch.zeros(3, 4)), torch.nn.Parameter(torch.zeros(3, 4))
    weights = WorkingWeights([working])
    left, right = torch.randn(3, 5).to(torch.bfloat16), torch.randn(5, 4).to(torch.bfloat16)
    assert torch.equal(weight_gradient(plain, left, right), left @ right)
    for _ in range(2):
        assert weight_gradient(working, left, right) is None
    assert working.grad is None
    with weights.masters():
        assert torch.equal(working.grad, (left @ right).float() + (left @ right))


@cuda
@pytest.mark.gpu
def test_weight_gradient_sums_float32_products_on_the_gpu():
    """On CUDA the product adds itself into the sum in float32, without the bf16 rounding of each product that
    the sum of autograd's bf16 gradients carries (about 2e-3 relative at these sizes)."""
    weight = torch.nn.Parameter(torch.zeros(256, 512, device="cuda"))
    weights = WorkingWeights([weight])
    torch.manual_seed(0)
    products = [(torch.randn(256, 1024, device="cuda").to(torch.bfloat16),
                 torch.randn(1024, 512, device="cuda").to(torch.bfloat16)) for _ in range(3)]
    for left, right in products:
        weight_gradient(weight, left, right)
    exact = sum(left.double() @ right.double() for left, right in products)
    rounded = sum((left @ right).double() for left, right in products)
    with weights.masters():
        error = ((weight.grad.double() - exact).norm() / exact.norm()).item()
    assert error < 1e-5 < ((rounded - exact).norm() / exact.norm()).item()
