"""FALinear under torch.autocast computes as nn.Linear does: in the autocast dtype, with fp32
accumulation, and fp32 master weights get fp32 gradients.

With feedback = weight, FA's gradients are backprop's, so an autocast nn.Linear (+ activation)
is the exact reference; both are held to the float64 oracle on autocast's casts within the fixed
bounds of the autocast dtype (``fa_triton.testing.layer_bounds``).
"""

import pytest
import torch
from torch import nn

from fa_triton import FALinear, fa_linear
from tests.helpers import KERNEL_DEVICE
from tests.oracle import OUTPUTS, assert_parity, layer_bounds, oracle

ACTIVATION_MODULES = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "identity": nn.Identity}


def twin_layers(activation, device, in_features=24, out_features=10, backend="auto"):
    """An FALinear and nn.Linear + activation with equal weights, and feedback = weight."""
    torch.manual_seed(0)
    layer = FALinear(in_features, out_features, activation=activation, backend=backend, device=device)
    with torch.no_grad():
        layer.feedback.copy_(layer.weight)
    linear = nn.Linear(in_features, out_features, device=device)
    linear.load_state_dict({"weight": layer.weight, "bias": layer.bias})
    return layer, nn.Sequential(linear, ACTIVATION_MODULES[activation]())


def step(model, x, grad_seed=1):
    x = x.detach().clone().requires_grad_(True)
    y = model(x)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(grad_seed)).to(y.device, y.dtype)
    y.backward(grad_y)
    return y.detach(), x.grad, *(p.grad for p in model.parameters())


def assert_autocast_like_linear(activation, device, dtype, backend="auto", exact=False):
    layer, reference = twin_layers(activation, device, backend=backend)
    x = torch.randn(3, 7, 24, device=device)
    with torch.autocast(device, dtype=dtype):
        fa = step(layer, x)
        bp = step(reference, x)
    y, grad_x, grad_w, grad_b = fa
    assert y.dtype == dtype
    # Leaves keep their dtype: fp32 master weights (and the fp32 input) get fp32 gradients.
    assert grad_x.dtype == grad_w.dtype == grad_b.dtype == torch.float32
    assert layer.feedback.grad is None
    for name, a, b in zip(OUTPUTS, fa, bp):
        assert a.dtype == b.dtype, name
        if exact:
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    # Both within the fixed bounds of the float64 oracle on the casts autocast makes (B = W): the
    # gradients of the fp32 leaves are the low-precision ones cast up, exactly.
    x_cast, w_cast, b_cast = (t.detach().to(dtype) for t in (x, layer.weight, layer.bias))
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)  # step's
    expected = oracle(x_cast, w_cast, b_cast, w_cast, grad_y, activation)
    bounds = layer_bounds(x_cast, w_cast, b_cast, w_cast, grad_y, activation, dtype=dtype)
    for label, outputs in (("FALinear", fa), ("nn.Linear", bp)):
        assert_parity(dict(zip(OUTPUTS, outputs)), expected, bounds=bounds, name=f"{label} under autocast {dtype}")
    # ...and the result is a low-precision one: fp32 arithmetic would differ.
    y32 = layer(x).detach()
    assert not torch.equal(y.float(), y32)
    torch.testing.assert_close(y.float(), y32, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("activation", ["relu", "gelu", "identity"])
def test_cpu_autocast_bf16_matches_nn_linear(activation):
    # The reference path runs the same matmuls on the same bf16 casts as autocast nn.Linear:
    # bitwise equal, except gelu's derivative, which the reference forms in bf16 ops
    # where PyTorch's gelu backward computes in fp32.
    assert_autocast_like_linear(activation, "cpu", torch.bfloat16, exact=activation != "gelu")


def test_cpu_autocast_fp16_triton_kernels(kernel_device):
    # The kernels (Triton's interpreter on the CPU) take autocast's fp16 casts too.
    if kernel_device != "cpu":
        pytest.skip("CPU autocast with the interpreted kernels; the GPU runs test_cuda_autocast")
    assert_autocast_like_linear("tanh", "cpu", torch.float16, backend="triton")


def test_autocast_only_for_its_device_and_when_enabled():
    layer = FALinear(8, 4)
    x = torch.randn(5, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.autocast("cpu", enabled=False):
            assert layer(x).dtype == torch.float32
        # float64 is left alone by autocast, as for nn.Linear.
        assert layer.double()(x.double()).dtype == torch.float64
    with torch.autocast("cuda", dtype=torch.float16, enabled=torch.cuda.is_available()):
        assert layer.float()(x).dtype == torch.float32  # CPU tensors, CUDA autocast


def test_autocast_functional_mixed_dtypes():
    # Under autocast, a bf16 activation meets fp32 weights (as between autocast layers).
    x = torch.randn(4, 6, dtype=torch.bfloat16)
    weight, feedback = torch.randn(3, 6), torch.randn(3, 6)
    with pytest.raises(TypeError, match="weight has dtype torch.float32 but x has dtype torch.bfloat16"):
        fa_linear(x, weight, None, feedback)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fa_linear(x, weight, None, feedback)
    assert y.dtype == torch.bfloat16


def test_triton_backend_refuses_bf16_on_interpreter():
    # The interpreter has no bf16 arithmetic: an error rather than garbage.
    if KERNEL_DEVICE != "cpu":
        pytest.skip("needs the interpreter (no GPU)")
    layer = FALinear(8, 4, backend="triton")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(TypeError, match="no bfloat16 arithmetic"):
            layer(torch.randn(2, 8))
    with pytest.raises(TypeError, match="no bfloat16 arithmetic"):
        layer.bfloat16()(torch.randn(2, 8, dtype=torch.bfloat16))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("activation", ["relu", "gelu", "identity"])
def test_cuda_autocast_matches_nn_linear(activation, dtype):
    # Triton kernels vs cuBLAS: both accumulate in fp32 from the same low-precision casts.
    assert_autocast_like_linear(activation, "cuda", dtype)
