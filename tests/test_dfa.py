"""Direct feedback alignment (fa_triton/dfa.py): the float64 oracle of its equations
(``fa_triton.testing.dfa_oracle``) in both backends within the fixed bounds, one GEMM for every
layer's projection, conversion, checkpoints, training."""

import pytest
import torch
from torch import nn

import fa_triton
from fa_triton import DFANetwork, FALinear
from fa_triton.kernels import linear_kernels
from tests.helpers import KERNEL_DEVICE, teacher_task, train_on
from tests.oracle import activation_and_derivative, assert_parity, dfa_bounds, dfa_oracle


def _network(backend, dtype, device, activations=("tanh", "relu", "gelu", "identity"), widths=(19, 23, 17, 11, 5)):
    torch.manual_seed(0)
    layers = [FALinear(n_in, n_out, activation=act, method="backprop", backend=backend, device=device, dtype=dtype)
              for n_in, n_out, act in zip(widths[:-1], widths[1:], activations)]
    return DFANetwork(layers, nn.Flatten(), backend=backend)


@pytest.mark.parametrize("backend, dtype", [("torch", torch.float64), ("torch", torch.float32),
                                            ("torch", torch.float16), ("triton", torch.float32),
                                            ("triton", torch.float16)])
def test_dfa_against_the_oracle(backend, dtype):
    # Fixed bounds (float64: 1e-12 relative; else derived from rounding through the chain), the
    # same for the reference (the torch cases) and the kernels.
    device = KERNEL_DEVICE if backend == "triton" else "cpu"
    net = _network(backend, dtype, device)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(37, 19, generator=gen, dtype=torch.float64).to(dtype).to(device).view(37, 1, 19)
    error = torch.randn(37, 5, generator=gen, dtype=torch.float64).to(dtype).to(device)
    y = net(x)
    y.backward(error)
    flat = x.reshape(37, 19)  # after the network's prefix (a flatten)
    expected = dfa_oracle(net.layers, net.feedback, flat, error)  # B_l: columns of the stored feedback
    bounds = None if dtype == torch.float64 else dfa_bounds(net.layers, net.feedback, flat, error, dtype=dtype)
    result = {"y": y, **{name: p.grad for name, p in net.named_parameters()}}
    assert set(result) == set(expected)
    assert_parity(result, expected, dtype, bounds=bounds, name=f"DFANetwork ({backend})")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_frozen_hidden_parameters_get_no_gradient_and_the_rest_the_oracles(backend, kernel_device):
    # The hidden layers' grad_b come from one pass over δ of all of them, split: with one bias and
    # another layer's weight frozen, each trainable parameter still gets its own layer's piece.
    # No prefix (the input goes to the first layer as it is).
    device = kernel_device if backend == "triton" else "cpu"
    dtype = torch.float64 if backend == "torch" else torch.float32
    net = _network(backend, dtype, device)
    net = DFANetwork(list(net.layers), backend=backend)
    net.layers[0].bias.requires_grad_(False)
    net.layers[1].weight.requires_grad_(False)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(9, 19, generator=gen, dtype=torch.float64).to(dtype).to(device)
    error = torch.randn(9, 5, generator=gen, dtype=torch.float64).to(dtype).to(device)
    y = net(x)
    y.backward(error)
    expected = dfa_oracle(net.layers, net.feedback, x, error)
    assert net.layers[0].bias.grad is None and net.layers[1].weight.grad is None
    result = {"y": y, **{name: p.grad for name, p in net.named_parameters() if p.requires_grad}}
    expected = {name: value for name, value in expected.items() if name in result}
    assert len(result) == 1 + 2 * 4 - 2
    bounds = None if dtype == torch.float64 else dfa_bounds(net.layers, net.feedback, x, error, dtype=dtype)
    assert_parity(result, expected, dtype, bounds=bounds, name=f"DFANetwork with frozen parameters ({backend})")


def test_every_projection_is_one_gemm(kernel_device, monkeypatch):
    # All hidden layers share their activation: one launch of the DFA kernel projects e to all of them.
    launches = []
    run = linear_kernels.dfa_delta_kernel.run
    monkeypatch.setattr(linear_kernels.dfa_delta_kernel, "run",
                        lambda *a, grid, **k: (launches.append(grid), run(*a, grid=grid, **k))[1])
    net = _network("triton", torch.float32, kernel_device, activations=("relu", "relu", "relu", "identity"))
    net(torch.randn(8, 19, device=kernel_device)).sum().backward()
    assert len(launches) == 1
    mixed = _network("triton", torch.float32, kernel_device)  # tanh, relu, gelu: one launch per run of one activation
    launches.clear()
    mixed(torch.randn(8, 19, device=kernel_device)).sum().backward()
    assert len(launches) == 3


def test_inference_is_the_plain_forward():
    net = _network("torch", torch.float64, "cpu")
    x = torch.randn(6, 19, dtype=torch.float64)
    with torch.no_grad():
        plain = net(x)
    torch.testing.assert_close(net(x).detach(), plain, rtol=0, atol=0)


def test_convert_builds_a_dfa_network_that_learns():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    net, summary = fa_triton.convert(model, method="dfa", return_summary=True)
    assert isinstance(net, DFANetwork) and net.feedback.shape == (4, 128) and len(summary.converted) == 3
    assert net.layers[0].weight is not model[1].weight and torch.equal(net.layers[0].weight, model[1].weight)
    x, target = teacher_task()
    losses = train_on(net, x, target, 80)
    assert sum(losses[-10:]) < 0.8 * sum(losses[:10])
    copy = fa_triton.convert(model, method="dfa")
    copy.load_state_dict(net.state_dict())
    assert torch.equal(copy.feedback, net.feedback) and "feedback" in net.state_dict()


@pytest.mark.parametrize(
    "model, kwargs, match",
    [
        (nn.Linear(4, 3), {}, r"at least one hidden .* has 1 such layer"),
        (nn.Sequential(nn.Linear(4, 3)), {}, "at least two nn.Linear"),
        (nn.Sequential(nn.Linear(4, 3), nn.Dropout(), nn.Linear(3, 2)), {}, "module '1' is a Dropout"),
        (nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 3), nn.Linear(3, 2)), {}, "prefix must have no parameters"),
        (nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)), {"inplace": True}, "inplace, include and exclude"),
    ],
)
def test_dfa_conversion_errors(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fa_triton.convert(model, method="dfa", **kwargs)


@pytest.mark.parametrize("widths", [(6, 5, 5, 5, 3), (6, 4, 7, 5, 3)], ids=["equal", "unequal"])
def test_dfa_model_sends_each_layer_its_own_columns(widths):
    # DFAModel: hidden layer l (in run order) gets e·B[:, its columns], reshaped, through its own
    # backward (its f'); checked per layer against the equations in float64. Equal widths make a
    # slice taken at the wrong offset (the first columns for every layer, or the slices in reverse
    # order) wrong in value, not only in shape.
    torch.manual_seed(3)
    activations = ("tanh", "relu", "sigmoid", "identity")
    layers = [FALinear(n_in, n_out, activation=act, method="backprop", dtype=torch.float64)
              for n_in, n_out, act in zip(widths[:-1], widths[1:], activations)]
    model = fa_triton.DFAModel(nn.Sequential(*layers))
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(7, widths[0], generator=gen, dtype=torch.float64)
    error = torch.randn(7, widths[-1], generator=gen, dtype=torch.float64)
    model(x).backward(error)
    feedback, start = model.feedback, 0
    h = x
    for layer in layers:
        z = h @ layer.weight.detach().t() + layer.bias.detach()
        y, fprime = activation_and_derivative(z, layer.activation, layer.negative_slope)
        if layer is layers[-1]:
            delta = error * fprime  # the output layer: its exact gradient
        else:
            width = layer.out_features
            delta = (error @ feedback[:, start:start + width]) * fprime
            start += width
        torch.testing.assert_close(layer.weight.grad, delta.t() @ h, rtol=0, atol=1e-12)
        torch.testing.assert_close(layer.bias.grad, delta.sum(0), rtol=0, atol=1e-12)
        h = y
    assert start == feedback.shape[1]


def test_changing_b_in_place_before_backward_is_an_error():
    # Every tensor DFA's backward reads is saved through ctx.save_for_backward: B changed in
    # place between forward and backward is caught, not silently used.
    net = _network("torch", torch.float64, "cpu")
    out = net(torch.randn(3, 1, 19, dtype=torch.float64))
    with torch.no_grad():
        net.feedback.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()
    model = fa_triton.DFAModel(nn.Sequential(FALinear(6, 5, method="backprop"), FALinear(5, 3, method="backprop")))
    model(torch.randn(2, 6))  # draws B
    out = model(torch.randn(2, 6))
    with torch.no_grad():
        model.feedback.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()
