"""Bad input (fa_triton/validation.py): a clear TypeError/ValueError naming the argument."""

import pytest
import torch

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
        (dict(in_features=0, out_features=3), ValueError, "in_features must be positive, got 0"),
        (dict(in_features=4, out_features=-2), ValueError, "out_features must be positive, got -2"),
        (dict(in_features=4.0, out_features=2), TypeError, "in_features must be an int, got float"),
        (dict(in_features=4, out_features=2, activation="swish"), ValueError, "activation must be one of"),
        (dict(in_features=4, out_features=2, backend="cudnn"), ValueError, "backend must be one of"),
    ],
)
def test_bad_constructor_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        FALinear(**kwargs)
