"""Parity of the Triton kernels (kernels/fa_linear.py) with the float64 oracle.

Without a GPU these run on CPU tensors through Triton's interpreter (see conftest.py), so
every kernel is exercised in CI; the `cuda`-marked tests need real hardware.
"""

import pytest
import torch

import fa_triton
from fa_triton import ACTIVATIONS, fa_linear
from fa_triton import kernels
from fa_triton.kernels import fa_linear as kernel_module
from conftest import KERNEL_DEVICE
from oracle import assert_parity, make_inputs, oracle, run_layer

# The interpreter has no bf16 arithmetic; bf16 is covered by the cuda-marked tests.
INTERPRETER_DTYPES = [torch.float32, torch.float16]

# (M, in_features, out_features): none a multiple of a block, plus the tutorial's layers.
SHAPES = [(1, 1, 1), (1, 7, 17), (7, 17, 113), (113, 7, 1), (17, 113, 7), (64, 784, 128), (64, 128, 64), (64, 64, 10)]


def triton_layer(*args, **kwargs):
    return fa_linear(*args, backend="triton", **kwargs)


def reference_layer(*args, **kwargs):
    return fa_triton.reference(*args, **kwargs)


def check_against_oracle(lead_shape, in_features, out_features, dtype, bias, activation, negative_slope=0.01,
                         device=KERNEL_DEVICE, transform=None):
    x, weight, b, feedback, grad_y = make_inputs(
        lead_shape, in_features, out_features, dtype, device, bias=bias, activation=activation,
        negative_slope=negative_slope,
    )
    if transform is not None:
        # The same view of grad_y keeps it aligned with x's rows (and non-contiguous too).
        x, grad_y = transform(x), transform(grad_y)
    expected = oracle(x, weight, b, feedback, grad_y, activation, negative_slope)
    result = run_layer(triton_layer, x, weight, b, feedback, grad_y, activation, negative_slope=negative_slope)
    torch_result = run_layer(reference_layer, x, weight, b, feedback, grad_y, activation,
                             negative_slope=negative_slope)
    assert_parity(result, torch_result, expected, dtype)
    return result


@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("activation", ["relu", "identity"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_parity_shapes(shape, activation, bias, dtype):
    M, in_features, out_features = shape
    check_against_oracle((M,), in_features, out_features, dtype, bias, activation)


@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES)
@pytest.mark.parametrize(
    "activation, negative_slope",
    [(a, 0.01) for a in ACTIVATIONS] + [("leaky_relu", 0.0), ("leaky_relu", -0.2), ("leaky_relu", 1.5)],
)
def test_parity_activations(activation, negative_slope, dtype):
    check_against_oracle((33,), 45, 70, dtype, True, activation, negative_slope)


@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES)
@pytest.mark.parametrize(
    "lead_shape, transform",
    [
        ((2, 5), None),  # 3-D batch
        ((), None),  # 1-D input, as nn.Linear takes
        ((3, 4, 2), None),  # 4-D batch
        ((19,), lambda x: x.t().contiguous().t()),  # transposed: stride (1, M)
        ((4, 10), lambda x: x[:, ::3]),  # non-contiguous 3-D slice (reshape must copy)
        ((6, 9), lambda x: x.transpose(0, 1)),  # permuted batch dims
    ],
    ids=["3d", "1d", "4d", "transposed", "strided-3d", "permuted-3d"],
)
def test_parity_input_layouts(lead_shape, transform, dtype):
    check_against_oracle(lead_shape, 23, 13, dtype, True, "gelu", transform=transform)


def test_transposed_input_is_not_copied(kernel_device, monkeypatch):
    x = torch.randn(40, 19, device=kernel_device).t()  # [19, 40], stride (1, 19)
    layer = fa_triton.FALinear(40, 8, backend="triton", device=kernel_device)
    seen = {}
    launch = kernels.fa_linear_forward

    def spy(x2d, *args, **kwargs):
        seen["ptr"], seen["stride"] = x2d.data_ptr(), x2d.stride()
        return launch(x2d, *args, **kwargs)

    monkeypatch.setattr(kernels, "fa_linear_forward", spy)
    layer(x)
    assert seen == {"ptr": x.data_ptr(), "stride": (1, 19)}


def test_expanded_upstream_gradient(kernel_device):
    # y.sum().backward() hands the layer a stride-0 gradient: it must be read through its strides.
    x, weight, b, feedback, _ = make_inputs((5, 6), 11, 9, torch.float32, kernel_device, activation="tanh")
    result = run_layer(triton_layer, x, weight, b, feedback, torch.ones(()).expand(5, 6, 9).to(kernel_device),
                       "tanh")
    expected = oracle(x, weight, b, feedback, torch.ones(5, 6, 9, device=kernel_device), "tanh")
    for name in ("grad_x", "grad_weight", "grad_bias"):
        torch.testing.assert_close(result[name].double(), expected[name], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("activation", ["relu", "gelu", "identity"])
def test_int64_offsets_path(activation, kernel_device, monkeypatch):
    # Offsets past 2**31 need tensors of gigabytes; force the int64 indexing path on a small
    # problem instead so that its arithmetic is checked too.
    monkeypatch.setattr(kernel_module, "_needs_int64", lambda *tensors: True)
    check_against_oracle((21,), 37, 19, torch.float32, True, activation, device=kernel_device)


def test_needs_int64_reads_offsets_not_sizes():
    meta = dict(device="meta", dtype=torch.float16)
    assert not kernel_module._needs_int64(torch.empty_strided((1024, 1024), (1024, 1), **meta))
    assert kernel_module._needs_int64(torch.empty_strided((2**21 + 1, 1024), (1024, 1), **meta))
    assert kernel_module._needs_int64(torch.empty_strided((2, 8), (2**31, 1), **meta))
    assert not kernel_module._needs_int64(torch.empty_strided((2**32, 8), (0, 1), **meta))  # expanded


def test_backward_is_deterministic(kernel_device):
    x, weight, b, feedback, grad_y = make_inputs((37,), 50, 29, torch.float32, kernel_device, activation="sigmoid")
    first = run_layer(triton_layer, x, weight, b, feedback, grad_y, "sigmoid")
    second = run_layer(triton_layer, x, weight, b, feedback, grad_y, "sigmoid")
    for name, value in first.items():
        assert torch.equal(value, second[name]), name


def test_feedback_gets_no_gradient(kernel_device):
    x, weight, b, feedback, grad_y = make_inputs((4,), 8, 8, torch.float32, kernel_device)
    feedback.requires_grad_(True)
    run_layer(triton_layer, x, weight, b, feedback, grad_y, "relu")
    assert feedback.grad is None


def test_only_needed_gradients(kernel_device):
    # Frozen weight with trainable bias, and input-only gradients, take their own paths.
    x, weight, b, feedback, grad_y = make_inputs((9,), 12, 5, torch.float32, kernel_device, activation="tanh")
    expected = oracle(x, weight, b, feedback, grad_y, "tanh")
    b_leaf = b.clone().requires_grad_(True)
    fa_linear(x, weight, b_leaf, feedback, "tanh", backend="triton").backward(grad_y)
    torch.testing.assert_close(b_leaf.grad.double(), expected["grad_bias"], atol=1e-5, rtol=1e-5)
    x_leaf = x.clone().requires_grad_(True)
    fa_linear(x_leaf, weight, b, feedback, "tanh", backend="triton").backward(grad_y)
    torch.testing.assert_close(x_leaf.grad.double(), expected["grad_x"], atol=1e-5, rtol=1e-5)


def test_fp32_dot_follows_allow_tf32(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    assert kernel_module._dot_precision(torch.float32) == "ieee"
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    assert kernel_module._dot_precision(torch.float32) == "tf32"


# ----------------------------------------------------------------------------- CUDA only

@pytest.mark.cuda
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", [(113, 784, 128), (1023, 1023, 1023), (8, 4096, 10)], ids=str)
def test_cuda_parity_bf16(shape, activation):
    M, in_features, out_features = shape
    check_against_oracle((M,), in_features, out_features, torch.bfloat16, True, activation, device="cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_parity_large(dtype):
    check_against_oracle((2048,), 4096, 4096, dtype, True, "relu", device="cuda")


@pytest.mark.cuda
def test_cuda_tf32(monkeypatch):
    # With tf32 allowed, both the kernel and cuBLAS round fp32 operands to tf32.
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    check_against_oracle((512,), 1024, 512, torch.float32, True, "relu", device="cuda")


@pytest.mark.cuda
def test_cuda_int64_offsets():
    # x has 2**31 + 1024 elements: offsets past int32 for real.
    M, K, N = 2**21 + 1, 1024, 16
    x = torch.randn(M, K, device="cuda", dtype=torch.float16)
    layer = fa_triton.FALinear(K, N, activation="identity", backend="triton", device="cuda", dtype=torch.float16)
    y = layer(x)
    torch.testing.assert_close(y[-5:].float(), (x[-5:].float() @ layer.weight.float().t() + layer.bias.float()),
                               atol=2e-2, rtol=2e-2)
