"""bf16 working weights against autocast's per-micro-batch casts: the same arithmetic, bit for bit."""

import contextlib
import copy

import pytest
import torch

from training_harness.registry import FAMILY_MODULES, get_family
from training_harness.working_weights import WorkingWeights, matrix_weights

VOCAB = 64
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def train(model, device: str, working: bool, steps: int = 2, micro_batches: int = 2) -> list[float]:
    """The trainer's step: micro-batches under bf16 autocast, clipping, AdamW; the gradient norms."""
    weights = WorkingWeights(matrix_weights(model)) if working else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, fused=device == "cuda")
    generator = torch.Generator().manual_seed(3)
    norms = []
    for _ in range(steps):
        for index in range(micro_batches):
            tokens = torch.randint(0, VOCAB, (2, 33), generator=generator).to(device)
            if weights:
                weights.begin_micro_batch(first=index == 0)
            with torch.autocast(device, dtype=torch.bfloat16):
                loss = model(tokens[:, :-1], tokens[:, 1:])
            (loss / micro_batches).backward()
        with weights.masters() if weights else contextlib.nullcontext():
            norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5).item())
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return norms


def assert_working_weights_train_as_autocast(name: str, device: str) -> None:
    torch.manual_seed(0)
    family = get_family(name)
    model = family.build(family.shape("0.5B", "tiny"), VOCAB, device, True)
    twin = copy.deepcopy(model)
    copied = {id(p) for p in matrix_weights(twin)}
    assert copied, "the backbone has matrix weights to copy"
    assert train(twin, device, working=True) == train(model, device, working=False)
    for (parameter_name, want), got in zip(model.named_parameters(), twin.parameters(), strict=True):
        # outside masters() the copied weights are their masters rounded to bf16, the rest untouched
        expected = want.to(torch.bfloat16) if id(got) in copied else want
        assert got.dtype == expected.dtype and torch.equal(got, expected), parameter_name


@pytest.mark.parametrize("name", sorted(FAMILY_MODULES))
def test_working_weights_train_as_autocasts_casts_on_cpu(name):
    assert_working_weights_train_as_autocast(name, "cpu")


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(FAMILY_MODULES))
def test_working_weights_train_as_autocasts_casts_on_the_gpu(name):
    """The families' GPU kernels (mamba-ssm, fla, the loss kernel) take bf16 weights and return their gradients
    as they do under autocast; a family whose library is not installed runs its reference path."""
    assert_working_weights_train_as_autocast(name, "cuda")


def test_the_masters_and_their_gradient_sums_are_what_autocast_would_leave():
    layer = torch.nn.Linear(4, 3, bias=False)
    plain = copy.deepcopy(layer)
    master = layer.weight.detach().clone()
    weights = WorkingWeights([layer.weight])
    assert layer.weight.dtype == torch.bfloat16 and torch.equal(layer.weight, master.to(torch.bfloat16))
    inputs = torch.randn(5, 4)
    for index in range(3):
        weights.begin_micro_batch(first=index == 0)
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
