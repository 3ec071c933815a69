"""FAConv2d (fa_triton/conv.py) against a float64 oracle written with unfold/fold
(``fa_triton.testing.conv2d_oracle``), for every method, B from the rule's equations
(``fa_triton.testing.layer_feedback``) and read back through the backward; backprop against
nn.Conv2d; geometry, dtypes, checkpoints, autocast, compile, errors; conv DFA (DFAModel); the
benchmark networks (fa_triton/models.py); BioTorch's defects."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fa_triton
import fa_triton.metrics
from fa_triton import METHODS, FAConv2d, FALinear, models
from tests.oracle import assert_feedback_rule, assert_parity, conv2d_oracle, feedback_from_backward, layer_feedback

GEOMETRIES = [  # (in, out, kernel, stride, padding, dilation, groups, bias, image H, W, batch)
    (3, 4, 3, 1, 1, 1, 1, True, 7, 5, 2),
    (4, 6, (3, 2), 2, 0, 1, 2, False, 9, 8, 1),
    (2, 3, 3, 1, 2, 2, 1, True, 6, 7, 3),
    (4, 4, 1, 1, 0, 1, 4, True, 5, 5, 2),
]


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: "x".join(map(str, g[:7])))
def test_every_method_against_the_oracle(method, geometry):
    c_in, c_out, k, stride, padding, dilation, groups, bias, h, w, n = geometry
    torch.manual_seed(0)
    layer = FAConv2d(c_in, c_out, k, stride, padding, dilation, groups, bias, activation="tanh", method=method,
                     dtype=torch.float64)
    x = torch.randn(n, c_in, h, w, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    B = layer_feedback(layer)  # from the rule's equations (brsf: the draw this forward made)
    expected = conv2d_oracle(x, layer.weight, layer.bias, B, grad_y, layer.stride, layer.padding, layer.dilation,
                             groups, "tanh")
    result = {"y": y, "grad_x": x.grad, "grad_weight": layer.weight.grad,
              "grad_bias": layer.bias.grad if bias else None}
    assert_parity(result, expected, torch.float64, name=f"FAConv2d({method})")
    assert_feedback_rule(feedback_from_backward(layer), method, layer.weight, feedback=layer.feedback)
    if method == "kp":
        assert torch.equal(layer.feedback.grad, layer.weight.grad)


@pytest.mark.parametrize("padding, padding_mode", [(1, "zeros"), ("same", "zeros"), ("same", "reflect"),
                                                   ("valid", "zeros"), (2, "circular"), (1, "replicate")])
def test_backprop_equals_nn_conv2d_in_float64(padding, padding_mode):
    torch.manual_seed(0)
    layer = FAConv2d(3, 4, (3, 2), padding=padding, padding_mode=padding_mode, dilation=(1, 2), method="backprop",
                     dtype=torch.float64)
    conv = nn.Conv2d(3, 4, (3, 2), padding=padding, padding_mode=padding_mode, dilation=(1, 2), dtype=torch.float64)
    conv.load_state_dict(layer.state_dict())
    x = torch.randn(2, 3, 8, 9, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y, y2 = layer(x), conv(x2)
    grad = torch.randn_like(y)
    y.backward(grad)
    y2.backward(grad)
    for got, want in ((y, y2), (x.grad, x2.grad), (layer.weight.grad, conv.weight.grad), (layer.bias.grad,
                                                                                          conv.bias.grad)):
        assert ((got - want).norm() / want.norm()).item() <= 1e-12


def test_defaults_init_and_repr_match_nn_conv2d():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 5)
    torch.manual_seed(0)
    layer = FAConv2d(3, 8, 5)
    assert torch.equal(layer.weight, conv.weight) and torch.equal(layer.bias, conv.bias)  # same init, same draws
    assert layer.activation == "identity" and layer.stride == (1, 1) and layer.padding == (0, 0)
    assert repr(layer) == "FAConv2d(3, 8, kernel_size=(5, 5), stride=(1, 1), padding=(0, 0), method=fa)"
    xavier = FAConv2d(3, 8, 5, method="usf", init="xavier", bias=True)
    assert torch.equal(xavier.bias, torch.zeros(8)) and "init=xavier" in repr(xavier)
    fan_in, fan_out = 3 * 25, 8 * 25
    assert xavier.rule.scale == pytest.approx((2 / (fan_in + fan_out)) ** 0.5)


def test_unbatched_input_dtypes_and_device_moves():
    layer = FAConv2d(2, 3, 3, padding=1, activation="relu")
    x = torch.randn(2, 6, 6)
    assert layer(x).shape == (3, 6, 6)  # [C, H, W] as nn.Conv2d takes it
    double = layer.to(torch.float64)
    assert double.feedback.dtype == torch.float64 and double(x.double()).dtype == torch.float64
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer32 = FAConv2d(2, 3, 3)
        xb = torch.randn(1, 2, 5, 5, requires_grad=True)
        y = layer32(xb)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer32.weight.grad.dtype == torch.float32 and xb.grad is not None
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float64 stays float64 under autocast, as nn.Conv2d's
        assert double(x.double()).dtype == nn.Conv2d(2, 3, 3).double()(x.double()).dtype == torch.float64


@pytest.mark.parametrize("method", list(METHODS))
def test_state_dict_round_trip(method):
    layer = FAConv2d(3, 4, 3, method=method)
    layer(torch.randn(1, 3, 5, 5)).sum().backward()
    copy = FAConv2d(3, 4, 3, method=method)
    copy.load_state_dict(layer.state_dict())
    torch.testing.assert_close(copy.feedback_matrix(), layer.feedback_matrix(), rtol=0, atol=0)


def test_bad_arguments_and_inputs():
    with pytest.raises(ValueError, match="divisible by groups"):
        FAConv2d(3, 4, 3, groups=2)
    with pytest.raises(ValueError, match="padding_mode must be one of"):
        FAConv2d(3, 4, 3, padding_mode="mirror")
    with pytest.raises(ValueError, match="must be one of"):
        FAConv2d(3, 4, 3, backend="triton")
    with pytest.raises(ValueError, match="'same' is not supported for strided"):
        FAConv2d(3, 4, 3, stride=2, padding="same")
    with pytest.raises(ValueError, match="method must be one of"):
        FAConv2d(3, 4, 3, method="dfa")
    layer = FAConv2d(3, 4, 3)
    with pytest.raises(ValueError, match="3 channels"):
        layer(torch.randn(1, 2, 5, 5))
    with pytest.raises(ValueError, match=r"input \[N, C, H, W\] or \[C, H, W\]"):
        layer(torch.randn(5, 5))
    with pytest.raises(TypeError, match="float64 on cpu but the weight is torch.float32"):
        layer(torch.randn(1, 3, 5, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="activation must be one of"):  # checked when set later too
        layer.activation = "rleu"
    with pytest.raises(ValueError, match="must be one of"):
        layer.backend = "triton"
    with pytest.raises(ValueError, match="negative_slope must be finite"):
        layer.negative_slope = float("inf")
    assert (layer.activation, layer.backend) == ("identity", "auto")


def test_compile_fullgraph_conv():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(FAConv2d(1, 3, 3, activation="relu", method="usf"), nn.Flatten(),
                          FALinear(3 * 4 * 4, 2, activation="identity", method="kp"))
    x = torch.randn(2, 1, 6, 6)
    model(x).sum().backward()
    eager = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    torch.compile(model, fullgraph=True)(x).sum().backward()
    for a, b in zip(eager, [p.grad for p in model.parameters()]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_conv_dfa_projects_the_output_error_to_each_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 3))
    net = fa_triton.convert(model, method="dfa")
    assert isinstance(net, fa_triton.DFAModel)
    x = torch.randn(4, 1, 6, 6, dtype=torch.float32)
    out = net(x)
    error = torch.randn_like(out)
    out.backward(error)
    conv, linear = net.model[0], net.model[4]
    assert net.feedback.shape == (3, 2 * 4 * 4)
    # The conv's output gets e·B, reshaped; its own backward applies tanh' and forms grad_W.
    z = F.conv2d(x, conv.weight, conv.bias)
    injected = (error @ net.feedback).view(4, 2, 4, 4) * (1 - torch.tanh(z) ** 2)
    torch.testing.assert_close(conv.weight.grad, torch.nn.grad.conv2d_weight(x, conv.weight.shape, injected))
    torch.testing.assert_close(conv.bias.grad, injected.sum((0, 2, 3)))
    # The output layer's gradient is exact.
    h = F.max_pool2d(torch.tanh(z), 2).flatten(1)
    torch.testing.assert_close(linear.weight.grad, error.t() @ h)


class _HeadFirst(nn.Module):
    """A model that registers its output layer before the layers that run first."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(4, 3)
        self.body = nn.Sequential(nn.Conv2d(1, 1, 3), nn.ReLU(), nn.Flatten())

    def forward(self, x):
        return self.head(self.body(x))


def test_conv_dfa_checks_which_layer_is_the_output():
    x = torch.randn(2, 1, 4, 4)
    net = fa_triton.convert(_HeadFirst(), method="dfa")  # default hidden: all but the last registered (body.0)
    with pytest.raises(ValueError, match="the last FA layer this model ran.*is in hidden"):
        net(x)
    net = fa_triton.DFAModel(net.model, hidden=[net.model.body[0]])
    out = net(x)
    error = torch.randn_like(out)
    out.backward(error)
    h = torch.relu(net.model.body[0](x)).flatten(1)
    torch.testing.assert_close(net.model.head.weight.grad, error.t() @ h)  # the output layer: exact
    with pytest.raises(ValueError, match="not in it"):
        fa_triton.DFAModel(net.model, hidden=[FAConv2d(1, 1, 3)])
    with pytest.raises(ValueError, match="output layer must be left out"):
        fa_triton.DFAModel(net.model, hidden=[net.model.body[0], net.model.head])


def test_conv_dfa_feedback_is_fixed_in_the_weights_dtype():
    torch.manual_seed(0)
    def network():  # pooled to 2×2 whatever the image size: only the conv's output size changes with it
        return nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(8, 3))

    net = fa_triton.convert(network(), method="dfa")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        net(torch.randn(2, 1, 6, 6)).float().sum().backward()
    assert net.feedback.dtype == torch.float32 and net.feedback.shape == (3, 2 * 4 * 4)
    drawn = net.feedback.clone()
    with pytest.raises(ValueError, match="DFA's B is fixed"):  # a larger image: other sizes, no new B
        net(torch.randn(2, 1, 8, 8))
    assert torch.equal(net.feedback, drawn)
    copy = fa_triton.convert(network(), method="dfa")
    copy.load_state_dict(net.state_dict())  # a drawn B from a checkpoint, then the same sizes train
    assert torch.equal(copy.feedback, drawn)
    copy(torch.randn(2, 1, 6, 6)).sum().backward()


def test_conv_dfa_compiles_fullgraph_once_drawn():
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = fa_triton.convert(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(32, 3)),
                            method="dfa")
    x = torch.randn(2, 1, 6, 6)
    net(x).sum().backward()  # draws B
    eager = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    torch.compile(net, fullgraph=True)(x).sum().backward()
    for a, b in zip(eager, [p.grad for p in net.parameters()]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    twin = copy.deepcopy(net)  # its taps are its own layers' (the hooks follow the copy)
    twin.zero_grad()
    twin(x).sum().backward()
    for a, b in zip(eager, [p.grad for p in twin.parameters()]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_gradient_alignment_of_a_dfa_model_is_measured_against_backprop():
    torch.manual_seed(0)
    net = fa_triton.convert(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(32, 3)),
                            method="dfa")
    x, y = torch.randn(8, 1, 6, 6), torch.randint(0, 3, (8,))
    angles = fa_triton.metrics.gradient_alignment(net, x, y, F.cross_entropy)
    assert angles[0] > 1.0  # e·B is not backprop's error: the hidden layer's gradient differs
    assert angles[1] == pytest.approx(0.0, abs=1e-3)  # the output layer's gradient is exact


@pytest.mark.parametrize("method", list(METHODS) + ["dfa"])
@pytest.mark.parametrize("network", ["lenet", "resnet20"])
def test_benchmark_networks_train_a_few_steps(network, method):
    # Every layer of every network moves under every rule; the sign-symmetric rules, whose B
    # starts aligned with W, already lower the loss in ten steps (random feedback needs more).
    torch.manual_seed(0)
    model = models.lenet(method, init="xavier") if network == "lenet" else models.resnet20(method)
    shape = (16, 1, 32, 32) if network == "lenet" else (8, 3, 32, 32)
    x, target = torch.randn(shape), torch.randint(0, 10, (shape[0],))
    layers = fa_triton.metrics.fa_layers(model)
    before = [layer.weight.detach().clone() for layer in layers]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01 if network == "lenet" else 0.05, momentum=0.9)
    losses = []
    for _ in range(10):
        loss = F.cross_entropy(model(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(not torch.equal(layer.weight, w) for layer, w in zip(layers, before))
    if method in ("backprop", "usf", "frsf", "brsf"):
        assert losses[-1] < 0.95 * losses[0]


def test_resnet56_builds():
    model = models.resnet56("usf")
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(853_018, rel=0.01)
    assert sum(isinstance(m, FAConv2d) for m in model.modules()) == 55


# ------------------------------------------------------------------ BioTorch's defects, absent here

def test_linear_takes_inputs_of_any_rank():
    layer = FALinear(5, 3, method="usf")
    assert layer(torch.randn(2, 4, 5)).shape == (2, 4, 3) and layer(torch.randn(5)).shape == (3,)


@pytest.mark.parametrize("method", list(METHODS))
def test_out_features_1_with_bias_backward(method):
    layer = FALinear(4, 1, method=method)
    x = torch.randn(3, 4, requires_grad=True)
    layer(x).sum().backward()
    assert layer.bias.grad.shape == (1,) and x.grad.shape == (3, 4)


@pytest.mark.parametrize("method", list(METHODS) + ["dfa"])
def test_float64_model_converts_and_trains(method):
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).double()
    converted = fa_triton.convert(model, method=method)
    x = torch.randn(2, 1, 6, 6, dtype=torch.float64)
    converted(x).sum().backward()
    layers = fa_triton.metrics.fa_layers(converted)
    assert all(layer.weight.dtype == torch.float64 for layer in layers)
    assert all(layer.feedback is None or layer.feedback.dtype == torch.float64 for layer in layers)
    assert all(layer.weight.grad is not None for layer in layers)


def test_brsf_with_kaiming_init():  # BioTorch raises a NameError here
    for layer in (FALinear(4, 3, method="brsf", init="kaiming"), FAConv2d(2, 3, 3, method="brsf", init="kaiming")):
        x = torch.randn(2, 4) if isinstance(layer, FALinear) else torch.randn(1, 2, 5, 5)
        layer(x).sum().backward()
        assert layer.weight.grad is not None
