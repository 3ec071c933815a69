"""fa_triton.testing itself: it imports without pytest, Triton or a GPU; its oracle builds B from
each rule's equations; its assertion names the worst element; its fixed bounds hold for the
arithmetic they model and are tight enough to catch coarser rounding; its checks catch the bugs
they are for (FA turned into backprop, a wrong brsf scale, a transposed conv sign rule, a bug
shared by both backends); gradcheck_fa passes where FA's gradient is the true one and fails where
it is not."""

import ast
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import fa_triton
from fa_triton import DFANetwork, FAConv2d, FALinear, fa_linear, testing
from fa_triton.ops.backends.registry import REGISTRY
from fa_triton.rules.philox import philox_uniform
from tests.oracle import make_inputs, run_layer

METHODS = list(fa_triton.METHODS)


# ------------------------------------------------------------------------ the module

def test_imports_without_pytest_triton_or_a_gpu():
    # triton and pytest made unimportable; no CUDA device visible; the kernels never loaded.
    code = (
        "import sys; sys.modules['triton'] = None; sys.modules['pytest'] = None\n"
        "import torch, fa_triton.testing as t\n"
        "x, w, B, g = torch.randn(3, 4), torch.randn(2, 4), torch.randn(2, 4), torch.randn(3, 2)\n"
        "t.assert_parity(fa_triton.reference(x.double(), w.double(), None, B.double(), 'tanh'),"
        " t.oracle(x, w, None, B, g, 'tanh')['y'], torch.float64)\n"
        "assert 'fa_triton.kernels' not in sys.modules, 'the kernels were imported'\n"
    )
    env = {"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", "import fa_triton\n" + code], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    tree = ast.parse(Path(testing.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not {name for name in imported if name.split(".")[0] in ("triton", "pytest") or "kernels" in name}


def test_public_names():
    for name in testing.__all__:
        assert hasattr(testing, name), name
    assert testing.METHODS == fa_triton.METHODS and testing.OUTPUTS == ("y", "grad_x", "grad_weight", "grad_bias")
    assert set(testing.ACTIVATION_ERROR_MODELS) == set(fa_triton.ACTIVATIONS)


# ------------------------------------------------------------------------ B from the equations

@pytest.mark.parametrize("init", ["kaiming", "xavier"])
def test_rule_scales_are_the_init_formulas(init):
    fan_in, fan_out = 300, 100
    usf, brsf = testing.rule_scale("usf", init, fan_in, fan_out), testing.rule_scale("brsf", init, fan_in, fan_out)
    if init == "kaiming":  # nn.Linear's U(±1/√fan_in): bound and standard deviation
        assert brsf == pytest.approx(1 / math.sqrt(300)) and usf == pytest.approx(1 / math.sqrt(900))
    else:
        assert brsf == pytest.approx(math.sqrt(6 / 400)) and usf == pytest.approx(math.sqrt(2 / 400))
    assert usf == pytest.approx(brsf / math.sqrt(3))  # the std of U(-b, b)
    # The init really draws from U(±b): the layer's weights fill it.
    torch.manual_seed(0)
    weight = FALinear(fan_in, fan_out, init=init).weight.detach()
    assert 0.99 * brsf < weight.abs().max() <= brsf
    assert testing.rule_scale("fa", init, 3, 4) is None
    assert testing.fans(torch.empty(4, 3, 5, 2)) == (30, 40) == FAConv2d(6, 4, (5, 2), groups=2).fans


def test_oracle_feedback_of_each_rule():
    gen = torch.Generator().manual_seed(0)
    weight, feedback = torch.randn(5, 7, generator=gen), torch.randn(5, 7, generator=gen)
    weight[0, 0] = 0.0
    s, b = 1 / math.sqrt(21), 1 / math.sqrt(7)
    B = {m: testing.oracle_feedback(m, weight, feedback, seed=3, counter=2) for m in METHODS}
    assert all(t.dtype == torch.float64 and t.shape == weight.shape for t in B.values())
    assert torch.equal(B["backprop"], weight.double())
    for m in ("fa", "kp", "wm"):
        assert torch.equal(B[m], feedback.double())
    assert torch.equal(B["usf"], s * torch.sign(weight.double()))
    assert torch.equal(B["frsf"], feedback.double().abs() * torch.sign(weight.double()))
    # brsf: b·U(0,1) from Philox at counter·N·K + n·K + k, with W's sign.
    uniform = philox_uniform(3, 2 * 35 + torch.arange(35)).double().view(5, 7)
    assert torch.equal(B["brsf"], b * uniform * torch.sign(weight.double()))
    assert B["brsf"][0, 0] == 0 and not torch.equal(B["brsf"], testing.oracle_feedback("brsf", weight, seed=3,
                                                                                      counter=3))
    with pytest.raises(ValueError, match="needs seed and counter"):
        testing.oracle_feedback("brsf", weight)
    with pytest.raises(ValueError, match="needs its feedback"):
        testing.oracle_feedback("frsf", weight)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_feedback_from_backward_is_the_rules_b(method, kind):
    torch.manual_seed(1)
    if kind == "linear":
        layer, x = FALinear(9, 6, method=method, activation="tanh"), torch.randn(4, 9)
    else:
        layer, x = FAConv2d(4, 6, (3, 2), padding=1, groups=2, method=method), torch.randn(2, 4, 5, 5)
    layer(x).sum().backward()  # brsf: a training step draws
    B = testing.feedback_from_backward(layer)
    assert B.dtype == layer.weight.dtype and B.shape == layer.weight.shape
    torch.testing.assert_close(B.double(), testing.layer_feedback(layer), rtol=2**-23, atol=0)
    testing.assert_feedback_rule(B, method, layer.weight, feedback=layer.feedback)
    if method == "brsf":
        assert int(layer.counter) == 1  # the probe made no draw
    # The layer's own oracle (float64 copy, so its result is the oracle's to float64 rounding).
    double = layer.double()
    double.zero_grad()
    x = x.double().requires_grad_(True)
    y = double(x)  # brsf: draw 2, the counter's value now
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    result = {"y": y, "grad_x": x.grad, "grad_weight": double.weight.grad, "grad_bias": double.bias.grad}
    testing.assert_parity(result, testing.layer_oracle(double, x, grad_y), torch.float64)


# ------------------------------------------------------------------------ the assertion

def test_assert_parity_names_the_worst_element():
    expected = torch.zeros(3, 4, dtype=torch.float64)
    got = torch.zeros(3, 4, dtype=torch.float64)
    got[1, 2], got[2, 3] = 1e-9, 3e-10
    with pytest.raises(AssertionError) as info:
        testing.assert_parity({"y": got}, {"y": expected}, torch.float64, name="mine")
    message = str(info.value)
    assert "mine: y: 2 of 12 elements exceed their bound" in message
    assert "worst at index (1, 2): got 1e-09, oracle 0" in message and "bound 1e-12" in message
    testing.assert_parity(got, expected, bounds=2e-9)  # explicit bounds: a number, a tensor or a dict
    bounds = torch.full((3, 4), 1e-12)
    bounds[1, 2] = 1e-8
    with pytest.raises(AssertionError, match=r"worst at index \(2, 3\)"):
        testing.assert_parity(got, expected, bounds=bounds)


def test_assert_parity_checks_none_shape_dtype_and_special_values():
    expected = {"y": torch.tensor([1.0, float("nan"), float("inf")], dtype=torch.float64), "grad_bias": None}
    testing.assert_parity({"y": expected["y"].float(), "grad_bias": None}, expected, bounds={"y": 0.0})
    with pytest.raises(AssertionError, match="grad_bias: expected None"):
        testing.assert_parity({"y": expected["y"], "grad_bias": torch.zeros(1)}, expected)
    with pytest.raises(AssertionError, match="y: missing"):
        testing.assert_parity({"grad_bias": None}, expected)
    with pytest.raises(AssertionError, match="dtype torch.float32, expected torch.float64"):
        testing.assert_parity(expected["y"].float(), expected["y"], torch.float64)
    with pytest.raises(AssertionError, match=r"shape \(2,\)"):
        testing.assert_parity(torch.zeros(2), expected["y"], bounds=1.0)
    with pytest.raises(AssertionError, match="1 of 3"):  # NaN where the oracle has a number
        testing.assert_parity(torch.tensor([float("nan"), float("nan"), float("inf")]), expected["y"], bounds=1.0)
    with pytest.raises(ValueError, match="needs elementwise bounds"):
        testing.assert_parity(torch.zeros(3), expected["y"], torch.float32)


# ------------------------------------------------------------------------ the bounds

def _round_mantissa(t: torch.Tensor, kept_bits: int, rounding=torch.round) -> torch.Tensor:
    """float64 ``t`` with ``kept_bits`` explicit mantissa bits (fp16: 10, fp32: 23), rounded to
    nearest (or by ``rounding``: torch.trunc truncates)."""
    mantissa, exponent = torch.frexp(t)
    scale = 2.0 ** (kept_bits + 1)
    return torch.ldexp(rounding(mantissa * scale) / scale, exponent)


def _layer_rounded_at(x, weight, bias, feedback, grad_y, activation, kept_bits, rounding=torch.round):
    """The layer in float64, each output and δ rounded once to ``kept_bits`` mantissa bits."""
    expected = testing.oracle(x, weight, bias, feedback, grad_y, activation)
    delta = _round_mantissa(testing.local_error(x, weight, bias, grad_y, activation)[1], kept_bits, rounding)
    return {"y": _round_mantissa(expected["y"], kept_bits, rounding),
            "grad_x": _round_mantissa(delta @ feedback.double(), kept_bits, rounding),
            "grad_weight": _round_mantissa(delta.t() @ x.double(), kept_bits, rounding),
            "grad_bias": _round_mantissa(delta.sum(0), kept_bits, rounding)}


@pytest.mark.parametrize("activation", ["tanh", "relu", "gelu", "sigmoid", "identity"])
@pytest.mark.parametrize("dtype, kept_bits, coarser_bits", [(torch.float16, 10, 6), (torch.float32, 23, 10)])
def test_bounds_hold_for_rounding_and_catch_a_coarser_one(dtype, kept_bits, coarser_bits, activation):
    # Rounding each output and δ once to the dtype (the least any implementation does) is within
    # the bounds.
    x, weight, b, feedback, grad_y = make_inputs((300,), 257, 130, dtype, "cpu", activation=activation)
    expected = testing.oracle(x, weight, b, feedback, grad_y, activation)
    bounds = testing.layer_bounds(x, weight, b, feedback, grad_y, activation, dtype=dtype)
    testing.assert_parity(_layer_rounded_at(x, weight, b, feedback, grad_y, activation, kept_bits), expected,
                          bounds=bounds)
    # A coarser precision (fp16's 10 bits for fp32; 6 bits for fp16), truncated, on positive
    # operands (errors that all point one way, as a worst case) breaks them for every output.
    x, weight, b, feedback, grad_y = (t.abs() for t in (x, weight, b, feedback, grad_y))
    x = (x.double() / 10).to(dtype)  # z of order 1: tanh and sigmoid away from saturation
    expected = testing.oracle(x, weight, b, feedback, grad_y, activation)
    bounds = testing.layer_bounds(x, weight, b, feedback, grad_y, activation, dtype=dtype)
    coarse = _layer_rounded_at(x, weight, b, feedback, grad_y, activation, coarser_bits, torch.trunc)
    for name in testing.OUTPUTS:
        with pytest.raises(AssertionError, match=name):
            testing.assert_parity({name: coarse[name]}, {name: expected[name]}, bounds=bounds)


@pytest.mark.parametrize("activation", fa_triton.ACTIVATIONS)
@pytest.mark.parametrize("shape", [((13,), 19, 11), ((17,), 21, 13), ((2, 9), 31, 17), ((29,), 8, 6)], ids=str)
def test_float64_tolerance_exceeds_the_float64_rounding_bound_at_the_suites_shapes(shape, activation):
    # The fixed float64 bound is sound where float64's own worst-case rounding bound is below it:
    # at the float64 layers of the suite (test_reference, test_methods, test_functional). At
    # 784 -> 128 it is not (about 2e-12): a wide float64 layer takes layer_bounds(dtype=float64).
    lead, k, n = shape
    x, weight, b, feedback, grad_y = make_inputs(lead, k, n, torch.float64, "cpu", activation=activation)
    expected = testing.oracle(x, weight, b, feedback, grad_y, activation)
    bounds = testing.layer_bounds(x, weight, b, feedback, grad_y, activation, dtype=torch.float64)
    for name in testing.OUTPUTS:
        fixed = testing.FLOAT64_TOLERANCE * max(1.0, expected[name].abs().max().item())
        assert bounds[name].max().item() < fixed, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dfa_bounds_hold_for_the_reference_and_catch_a_wrong_b(dtype):
    torch.manual_seed(0)
    layers = [FALinear(19, 23, activation="tanh", method="backprop", dtype=dtype),
              FALinear(23, 17, activation="gelu", method="backprop", dtype=dtype),
              FALinear(17, 5, activation="identity", method="backprop", dtype=dtype)]
    net = DFANetwork(layers, backend="torch")
    x, error = torch.randn(37, 19, dtype=dtype), torch.randn(37, 5, dtype=dtype)
    net(x).backward(error)
    result = {"y": net(x).detach(), **{name: p.grad for name, p in net.named_parameters()}}
    expected = testing.dfa_oracle(net.layers, net.feedback, x, error)
    bounds = testing.dfa_bounds(net.layers, net.feedback, x, error)
    testing.assert_parity(result, expected, dtype, bounds=bounds)
    shifted = net.feedback.clone()
    shifted[:, :23] = net.feedback[:, 17:40]  # the second layer's columns for the first: caught
    with pytest.raises(AssertionError, match="layers.0.weight"):
        testing.assert_parity(result, testing.dfa_oracle(net.layers, shifted, x, error), dtype, bounds=bounds)


# ------------------------------------------------------------------------ the checks catch their bugs

class _BackpropInDisguise(FALinear):
    """method "fa" whose forward passes W as B: FA turned into backprop (a planted bug)."""

    def forward(self, x):
        return fa_linear(x, self.weight, self.bias, self.weight, self.activation, backend=self.backend)


def test_fa_turned_into_backprop_fails_parity_by_name():
    torch.manual_seed(0)
    layer = _BackpropInDisguise(21, 13, activation="tanh", backend="torch", dtype=torch.float64)
    x, grad_y = torch.randn(17, 21, dtype=torch.float64), torch.randn(17, 13, dtype=torch.float64)
    result = run_layer(lambda x, w, b, B: fa_linear(x, w, b, w, "tanh", backend="torch"), x, layer.weight,
                       layer.bias, None, grad_y)
    B = testing.layer_feedback(layer)  # the feedback buffer, as the rule says
    delta = testing.local_error(x, layer.weight, layer.bias, grad_y, "tanh")[1]
    with pytest.raises(AssertionError, match="is δ·W, backprop's, not δ·B"):
        testing.assert_uses_feedback(result["grad_x"], delta, B, layer.weight)
    with pytest.raises(AssertionError, match="grad_x"):
        testing.assert_parity(result, testing.layer_oracle(layer, x, grad_y), torch.float64)
    with pytest.raises(AssertionError, match="B differs"):
        testing.assert_feedback_rule(testing.feedback_from_backward(layer), "fa", layer.weight,
                                     feedback=layer.feedback)


@pytest.mark.parametrize("factor", [0.5, 1.5])
def test_a_wrong_brsf_scale_is_caught(factor, monkeypatch):
    from fa_triton.layers.state import FeedbackState

    right = FeedbackState.feedback_scale.fget
    monkeypatch.setattr(FeedbackState, "feedback_scale", property(
        lambda self: right(self) * factor if self.method == "brsf" else right(self)))
    torch.manual_seed(0)
    layer = FALinear(40, 30, activation="tanh", method="brsf", backend="torch", dtype=torch.float64)
    x = torch.randn(17, 40, dtype=torch.float64, requires_grad=True)
    grad_y = torch.randn(17, 30, dtype=torch.float64)
    y = layer(x)  # a training forward: draw 1
    y.backward(grad_y)
    result = {"y": y, "grad_x": x.grad, "grad_weight": layer.weight.grad, "grad_bias": layer.bias.grad}
    with pytest.raises(AssertionError, match="grad_x"):
        testing.assert_parity(result, testing.layer_oracle(layer, x, grad_y), torch.float64)
    with pytest.raises(AssertionError, match="brsf's .B. must"):
        testing.assert_feedback_rule(testing.feedback_from_backward(layer), "brsf", layer.weight)


def test_a_transposed_conv_sign_rule_is_caught(monkeypatch):
    import fa_triton.ops.conv as conv_ops

    right = conv_ops.feedback_matrix

    def transposed(rule, weight, feedback, counter):  # sign taken from the kernel transposed (kh <-> kw)
        if rule.method in ("usf", "frsf", "brsf"):
            return right(rule, weight.transpose(2, 3).reshape(weight.shape), feedback, counter)
        return right(rule, weight, feedback, counter)

    monkeypatch.setattr(conv_ops, "feedback_matrix", transposed)
    torch.manual_seed(0)
    layer = FAConv2d(3, 4, (3, 2), padding=1, activation="tanh", method="usf", dtype=torch.float64)
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    expected = testing.conv2d_oracle(x, layer.weight, layer.bias, testing.layer_feedback(layer), grad_y, 1, 1, 1, 1,
                                     "tanh")
    result = {"y": y, "grad_x": x.grad, "grad_weight": layer.weight.grad, "grad_bias": layer.bias.grad}
    with pytest.raises(AssertionError, match="grad_x"):
        testing.assert_parity(result, expected, torch.float64)
    with pytest.raises(AssertionError, match="sign.B. is not sign.W."):
        testing.assert_feedback_rule(testing.feedback_from_backward(layer), "usf", layer.weight)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_bug_shared_by_both_backends_is_caught(dtype, monkeypatch):
    # grad_b × 1.001 in the reference's local error (the step the other backends are compared
    # with): the fixed bounds fail it, where a bound scaled by the reference's own error could not.
    torch_backend = REGISTRY["torch"]
    right = torch_backend.local_error

    def scaled(*args, **kwargs):
        delta, grad_b = right(*args, **kwargs)
        return delta, None if grad_b is None else grad_b * 1.001

    monkeypatch.setattr(torch_backend, "local_error", scaled)
    x, weight, b, feedback, grad_y = make_inputs((33,), 45, 70, dtype, "cpu", activation="tanh")
    result = run_layer(fa_linear, x, weight, b, feedback, grad_y, "tanh", backend="torch")
    expected = testing.oracle(x, weight, b, feedback, grad_y, "tanh")
    bounds = None if dtype == torch.float64 else testing.layer_bounds(x, weight, b, feedback, grad_y, "tanh")
    with pytest.raises(AssertionError, match="grad_bias"):
        testing.assert_parity(result, expected, dtype, bounds=bounds)


# ------------------------------------------------------------------------ gradcheck

@pytest.mark.parametrize("method", METHODS)
def test_gradcheck_fa_passes_as_backprop_and_fails_with_a_random_b(method):
    torch.manual_seed(0)
    layer = FALinear(5, 3, activation="tanh", method=method, backend="torch")
    x = torch.randn(4, 5)
    assert testing.gradcheck_fa(layer, x)
    if method != "backprop":  # FA's grad_x = δ B is not the derivative: gradcheck must fail
        assert not testing.gradcheck_fa(layer, x, as_backprop=False, raise_exception=False)
    assert layer.weight.dtype == torch.float32 and layer.method == method  # the layer is left alone


def test_gradcheck_fa_of_functions_convs_and_dfa():
    torch.manual_seed(0)
    x, w, b = torch.randn(4, 5), torch.randn(3, 5), torch.randn(3)
    assert testing.gradcheck_fa(fa_linear, x, w, b, kwargs=dict(activation="gelu", backend="torch", method="kp"))
    assert not testing.gradcheck_fa(fa_linear, x, w, b, as_backprop=False, feedback=torch.randn(3, 5),
                                    kwargs=dict(activation="gelu", backend="torch"), raise_exception=False)
    assert testing.gradcheck_fa(FALinear(5, 3, activation="sigmoid", backend="triton"), x)  # run on the reference
    conv = FAConv2d(2, 3, 3, padding=1, activation="tanh", method="brsf")
    assert testing.gradcheck_fa(conv, torch.randn(1, 2, 4, 4))
    assert not testing.gradcheck_fa(conv, torch.randn(1, 2, 4, 4), as_backprop=False, raise_exception=False)
    net = fa_triton.convert(nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)), method="dfa")
    assert testing.gradcheck_fa(net, torch.randn(3, 4))
    assert not testing.gradcheck_fa(net, torch.randn(3, 4), as_backprop=False, raise_exception=False)
