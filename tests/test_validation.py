"""Bad input (fa_triton/ops/validation.py, and every public entry point that uses it): a clear
TypeError/ValueError naming the argument, raised before torch sees it."""

import pytest
import torch
from torch import nn

import fa_triton
from fa_triton import FALinear, fa_linear


def inputs(**overrides):
    args = dict(x=torch.randn(4, 3), weight=torch.randn(5, 3), bias=torch.randn(5), feedback=torch.randn(5, 3))
    args.update(overrides)
    return args


BAD_CALLS = [
    (inputs(x=torch.randn(4, 7)), ValueError, r"x must have shape \[\.\.\., in_features=3\].*\(4, 7\)"),
    (inputs(x=torch.tensor(1.0)), ValueError, r"x must have shape .*got x of shape \(\)"),
    (inputs(feedback=torch.randn(3, 5)), ValueError, r"feedback must have the shape of weight \(5, 3\).*\(3, 5\)"),
    (inputs(bias=torch.randn(4)), ValueError, r"bias must have shape \(5,\).*\(4,\)"),
    (inputs(weight=torch.randn(5, 3, 1)), ValueError, r"weight must be 2-D.*\(5, 3, 1\)"),
    (inputs(weight=torch.randn(5, 3).double()), TypeError,
     r"weight has dtype torch.float64 but x has dtype torch.float32"),
    (inputs(feedback=torch.randn(5, 3).half()), TypeError, r"feedback has dtype torch.float16"),
    (inputs(bias=torch.randn(5).double()), TypeError, r"bias has dtype torch.float64"),
    (inputs(x=torch.ones(4, 3, dtype=torch.long)), TypeError, r"x must be a floating-point tensor.*torch.int64"),
    (inputs(feedback=torch.randn(5, 3, device="meta")), ValueError, r"feedback is on device meta but x is on cpu"),
    (inputs(x=[[1.0, 2.0, 3.0]]), TypeError, r"x must be a torch.Tensor, got list"),
    (inputs(bias=3.0), TypeError, r"bias must be a torch.Tensor or None, got float"),
]


@pytest.mark.parametrize("args, error, message", BAD_CALLS)
@pytest.mark.parametrize("function", [fa_linear, fa_triton.reference], ids=["fa_linear", "reference"])
def test_bad_inputs(function, args, error, message):
    with pytest.raises(error, match=message):
        function(args["x"], args["weight"], args["bias"], args["feedback"])


def test_unknown_activation_and_backend():
    args = inputs()
    with pytest.raises(ValueError, match=r"activation must be one of .*'relu'.*got 'softplus'"):
        fa_linear(*args.values(), activation="softplus")
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'triton', 'torch'\), got 'cuda'"):
        fa_linear(*args.values(), backend="cuda")
    with pytest.raises(TypeError, match="negative_slope must be a float, got str"):
        fa_linear(*args.values(), activation="leaky_relu", negative_slope="0.1")


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(in_features=0, out_features=3), ValueError, "in_features must be an int >= 1, got 0"),
        (dict(in_features=4, out_features=-2), ValueError, "out_features must be an int >= 1, got -2"),
        (dict(in_features=4.0, out_features=2), TypeError, "in_features must be an int, got float"),
        (dict(in_features=4, out_features=2, activation="swish"), ValueError, "activation must be one of"),
        (dict(in_features=4, out_features=2, backend="cudnn"), ValueError, "backend must be one of"),
    ],
)
def test_bad_constructor_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        FALinear(**kwargs)


def _dfa_network():
    return fa_triton.DFANetwork([FALinear(6, 5), FALinear(5, 4), FALinear(4, 3, activation="identity")])


def _dfa_model():
    return fa_triton.DFAModel(nn.Sequential(FALinear(6, 5, method="backprop"), FALinear(5, 3, method="backprop",
                                                                                         activation="identity")))


# (a call, the error, the message): every one of these once reached torch (an unclear error
# from deep inside it, or none at all) before an argument check named the argument.
ENTRY_POINTS = [
    # DFANetwork's training forward (its no_grad forward already said this)
    (lambda: _dfa_network()(torch.randn(2, 7)), ValueError,
     r"DFANetwork expects input \[\.\.\., 6\], got x of shape \(2, 7\)"),
    (lambda: _dfa_network()(torch.tensor(1.0)), ValueError, r"DFANetwork expects input \[\.\.\., 6\]"),
    (lambda: _dfa_network()(torch.ones(2, 6, dtype=torch.long)), TypeError,
     r"torch.float32 .* got x of dtype torch.int64"),
    (lambda: _dfa_network()(torch.ones(2, 6, dtype=torch.float64)), TypeError, r"got x of dtype torch.float64"),
    (lambda: _dfa_network()([[1.0] * 6]), TypeError, r"DFANetwork expects a torch.Tensor input, got list"),
    (lambda: fa_triton.DFANetwork(None), TypeError, r"layers must be a sequence of FALinear layers, got NoneType"),
    (lambda: fa_triton.DFANetwork(FALinear(3, 2)), TypeError,
     r"layers must be a sequence of FALinear layers, got FALinear"),
    (lambda: fa_triton.DFANetwork([FALinear(3, 2), FALinear(2, 2)], prefix="flatten"), TypeError, r"prefix must be"),
    # DFAModel
    (lambda: fa_triton.DFAModel("x"), TypeError, r"model must be an nn.Module, got str"),
    (lambda: fa_triton.DFAModel(nn.Sequential(FALinear(3, 2), FALinear(2, 2)), hidden=FALinear(3, 2)), TypeError,
     r"hidden must be a list .* for one layer pass \[layer\]"),
    # FAConv2d's geometry
    (lambda: fa_triton.FAConv2d(3, 4, -1), ValueError, r"kernel_size must be >= 1, got -1"),
    (lambda: fa_triton.FAConv2d(3, 4, "3"), TypeError, r"kernel_size must be an int or a pair of ints, got '3'"),
    (lambda: fa_triton.FAConv2d(3, 4, (3,)), TypeError, r"kernel_size must be an int or a pair of ints, got \(3,\)"),
    (lambda: fa_triton.FAConv2d(3, 4, 3, stride=0), ValueError, r"stride must be >= 1, got 0"),
    (lambda: fa_triton.FAConv2d(3, 4, 3, stride=-2), ValueError, r"stride must be >= 1, got -2"),
    (lambda: fa_triton.FAConv2d(3, 4, 3, dilation=0), ValueError, r"dilation must be >= 1, got 0"),
    (lambda: fa_triton.FAConv2d(3, 4, 3, padding=-1), ValueError, r"padding must be >= 0, got -1"),
    (lambda: fa_triton.FAConv2d(3, 4, 3, dtype=torch.int32), TypeError, r"dtype must be a floating-point"),
    (lambda: fa_triton.FAConv2d(3, 4, 3, backend="triton"), ValueError, r"FAConv2d's backend .*no Triton kernels"),
    # the models
    (lambda: fa_triton.models.lenet(num_classes=0), ValueError, r"num_classes must be an int >= 1, got 0"),
    (lambda: fa_triton.models.lenet(num_classes=2.5), TypeError, r"num_classes must be an int, got float"),
    (lambda: fa_triton.models.lenet(in_channels=-1), ValueError, r"in_channels must be an int >= 1, got -1"),
    (lambda: fa_triton.models.resnet20(num_classes="10"), TypeError, r"num_classes must be an int, got str"),
    (lambda: fa_triton.models.lenet(method="dfx"), ValueError, r"method must be one of .*'wm', 'dfa'\), got 'dfx'"),
    # the layers' own methods
    (lambda: FALinear(3, 2, method="wm").mirror(batch_size=-1), ValueError, r"batch_size must be an int >= 1, got -1"),
    (lambda: FALinear(3, 2, method="wm").mirror(batch_size=2.5), TypeError, r"batch_size must be an int, got float"),
    (lambda: FALinear(3, 2).reset_feedback(generator="seed"), TypeError, r"generator must be a torch.Generator"),
    (lambda: fa_triton.FAConv2d(1, 2, 3, method="wm").mirror(size=0), ValueError, r"size must be an int >= 1"),
    # FALinear's dtype
    (lambda: FALinear(3, 2, dtype=torch.int64), TypeError, r"dtype must be a floating-point torch.dtype or None"),
    (lambda: FALinear(3, 2, dtype=torch.bool), TypeError, r"dtype must be a floating-point torch.dtype or None"),
    (lambda: FALinear(3, 2, dtype="float32"), TypeError, r"dtype must be a floating-point torch.dtype or None"),
    # fa takes no seed, scale or draw counter: given, they are an error, not ignored
    (lambda: fa_linear(*inputs().values(), seed=3), ValueError, r"method='fa' takes no seed, got 3"),
    (lambda: fa_linear(*inputs().values(), feedback_scale=0.1), ValueError, r"method='fa' takes no feedback_scale"),
    (lambda: fa_linear(*inputs().values(), counter=torch.zeros(1, dtype=torch.int64)), ValueError,
     r"method='fa' takes no counter"),
    # convert never turns an explicit "triton" into something else
    (lambda: fa_triton.convert(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2, 2)), backend="triton"),
     ValueError, r"backend='triton', but the model has an nn.Conv2d"),
]


@pytest.mark.parametrize("call, error, message", ENTRY_POINTS, ids=range(len(ENTRY_POINTS)))
def test_every_entry_point_names_the_bad_argument(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_dfa_model_on_an_empty_batch():
    model = _dfa_model()
    out = model(torch.randn(0, 6))
    out.sum().backward()
    assert out.shape == (0, 3) and model.feedback.shape == (3, 5)
