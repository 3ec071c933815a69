"""Parity of the Triton kernels, through their launchers (kernels/launchers.py), with the float64 oracle
(``fa_triton.testing``), within the fixed bounds derived from rounding; the reference backend is held
to the same bounds first.

Without a GPU these run on CPU tensors through Triton's interpreter (see conftest.py), so
every kernel is exercised in CI; the `cuda`-marked tests need real hardware.
"""

import pytest
import torch

import fa_triton
from fa_triton import ACTIVATIONS, fa_linear, kernels
from fa_triton.kernels import autotune, launchers, plans, tuning
from fa_triton.kernels.tuning import LaunchConfig
from tests.helpers import KERNEL_DEVICE
from tests.oracle import (
    activation_and_derivative,
    assert_backends_parity,
    assert_parity,
    assert_within_bounds,
    layer_bounds,
    local_error,
    local_error_bounds,
    make_inputs,
    oracle,
    oracle_feedback,
    run_layer,
    tf32_bounds,
)

# The interpreter has no bf16 arithmetic; bf16 is covered by the cuda-marked tests.
INTERPRETER_DTYPES = [torch.float32, torch.float16]

# (M, in_features, out_features): none a multiple of a block, plus the tutorial's layers.
SHAPES = [(1, 1, 1), (1, 7, 17), (7, 17, 113), (113, 7, 1), (17, 113, 7), (64, 784, 128), (64, 128, 64), (64, 64, 10)]


@pytest.fixture(autouse=True)
def fresh_plans():
    """Each test builds its own launch plans (some patch what a plan is built from)."""
    plans.clear_plans()
    yield
    plans.clear_plans()


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
    bounds = layer_bounds(x, weight, b, feedback, grad_y, activation, negative_slope, dtype=dtype)
    result = run_layer(triton_layer, x, weight, b, feedback, grad_y, activation, negative_slope=negative_slope)
    torch_result = run_layer(reference_layer, x, weight, b, feedback, grad_y, activation,
                             negative_slope=negative_slope)
    assert_backends_parity(result, torch_result, expected, dtype, bounds)
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
    ones = torch.ones(5, 6, 9, device=kernel_device)
    expected = oracle(x, weight, b, feedback, ones, "tanh")
    assert_parity(result, expected, torch.float32, bounds=layer_bounds(x, weight, b, feedback, ones, "tanh"))


@pytest.mark.parametrize("activation", ["relu", "gelu", "identity"])
def test_int64_offsets_path(activation, kernel_device, monkeypatch):
    # Offsets past 2**31 need tensors of gigabytes; force the int64 indexing path on a small
    # problem instead so that its arithmetic is checked too.
    monkeypatch.setattr(plans, "needs_int64", lambda *tensors: True)
    check_against_oracle((21,), 37, 19, torch.float32, True, activation, device=kernel_device)


def test_needs_int64_reads_offsets_not_sizes():
    meta = dict(device="meta", dtype=torch.float16)
    assert not plans.needs_int64(torch.empty_strided((1024, 1024), (1024, 1), **meta))
    assert plans.needs_int64(torch.empty_strided((2**21 + 1, 1024), (1024, 1), **meta))
    assert plans.needs_int64(torch.empty_strided((2, 8), (2**31, 1), **meta))
    assert not plans.needs_int64(torch.empty_strided((2**32, 8), (0, 1), **meta))  # expanded


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
    bounds = layer_bounds(x, weight, b, feedback, grad_y, "tanh")
    b_leaf = b.clone().requires_grad_(True)
    fa_linear(x, weight, b_leaf, feedback, "tanh", backend="triton").backward(grad_y)
    assert_parity(b_leaf.grad, expected["grad_bias"], torch.float32, bounds=bounds["grad_bias"], name="grad_bias")
    x_leaf = x.clone().requires_grad_(True)
    fa_linear(x_leaf, weight, b, feedback, "tanh", backend="triton").backward(grad_y)
    assert_parity(x_leaf.grad, expected["grad_x"], torch.float32, bounds=bounds["grad_x"], name="grad_x")


def test_fp32_dot_follows_pytorchs_tf32_switches(fp32_matmul_precision):
    fp32_matmul_precision(False, switch="allow_tf32")
    assert plans.dot_precision(torch.float32) == "ieee"
    fp32_matmul_precision(True, switch="allow_tf32")
    assert plans.dot_precision(torch.float32) == "tf32"
    assert plans.dot_precision(torch.float16) == "tf32"  # no effect on half types
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        # The newer switch (torch >= 2.9); once it is set, reading allow_tf32 raises.
        fp32_matmul_precision(False, switch="fp32_precision")
        assert plans.dot_precision(torch.float32) == "ieee"
        fp32_matmul_precision(True, switch="fp32_precision")
        assert plans.dot_precision(torch.float32) == "tf32"


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
@pytest.mark.parametrize("activation", ["relu", "identity"])
def test_cuda_tf32(activation, fp32_matmul_precision):
    # With tf32 allowed the kernels round fp32 operands to tf32: every element of every output
    # must be within the bound derived from tf32's rounding (oracle.tf32_bounds).
    fp32_matmul_precision(True)
    x, weight, b, feedback, grad_y = make_inputs((512,), 1024, 512, torch.float32, "cuda", activation=activation)
    bounds = tf32_bounds(x, weight, b, feedback, grad_y, activation)
    grad_y = torch.where(bounds["kink"].to(grad_y.device), 0.0, grad_y)
    expected = oracle(x, weight, b, feedback, grad_y, activation)
    result = run_layer(triton_layer, x, weight, b, feedback, grad_y, activation)
    assert_within_bounds(result, expected, bounds)


@pytest.mark.cuda
def test_cuda_int64_offsets():
    # x has 2**31 + 1024 elements: offsets past int32 for real.
    M, K, N = 2**21 + 1, 1024, 16
    x = torch.randn(M, K, device="cuda", dtype=torch.float16)
    layer = fa_triton.FALinear(K, N, activation="identity", backend="triton", device="cuda", dtype=torch.float16)
    y = layer(x)
    torch.testing.assert_close(y[-5:].float(), (x[-5:].float() @ layer.weight.float().t() + layer.bias.float()),
                               atol=2e-2, rtol=2e-2)


# ------------------------------------------------------ split-K for grad_W and launch configs

def _weight_grads_against_oracle(M, in_features, out_features, dtype, bias, activation, device, **launch_kwargs):
    """grad_W and grad_b from the backward-weight launcher, checked against the float64 oracle
    with the suite's tolerance policy (the fixed bounds of ``layer_bounds``, the reference
    held to them too). Returns them."""
    x, weight, b, feedback, grad_y = make_inputs((M,), in_features, out_features, dtype, device, bias=bias,
                                                 activation=activation)
    full = oracle(x, weight, b, feedback, grad_y, activation)
    expected = {name: full[name] for name in ("grad_weight", "grad_bias")}
    bounds = layer_bounds(x, weight, b, feedback, grad_y, activation, dtype=dtype)
    torch_result = run_layer(reference_layer, x, weight, b, feedback, grad_y, activation)
    store_extra = fa_triton.rules.activations.saves_extra(activation, 0.01)
    y, extra = kernels.fa_linear_forward(x, weight, b, activation, 0.01, store_extra)
    saved = None if activation == "identity" else (extra if store_extra else y)
    grad_w, grad_b = kernels.fa_linear_backward_weight(grad_y, saved, x, activation, 0.01, bias_grad=bias,
                                                       **launch_kwargs)
    assert_backends_parity({"grad_weight": grad_w, "grad_bias": grad_b}, torch_result, expected, dtype, bounds,
                           name="backward-weight launcher")
    return grad_w, grad_b


@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("activation", ["relu", "gelu", "identity"])
@pytest.mark.parametrize("split_k", [2, 3, 7])
def test_split_k_parity(split_k, activation, bias, dtype, kernel_device, launches):
    # 300 rows = 5 blocks of the interpreter's 64-row steps: 2, 3 and 7 slices (7 is cut to 5).
    _weight_grads_against_oracle(300, 20, 7, dtype, bias, activation, kernel_device, split_k=split_k)
    weight_grids = [grid for name, grid in launches if name == "backward_weight_kernel"]
    assert "split_sum_kernel" in [name for name, _ in launches], "the split-K path did not run"
    if launchers.INTERPRETED:
        assert weight_grids[-1][1] == tuning.split_plan(300, split_k, 64)[0]


def test_split_k_is_deterministic_and_close_to_unsplit(kernel_device):
    args = (257, 33, 19, torch.float32, True, "tanh", kernel_device)
    first = _weight_grads_against_oracle(*args, split_k=4)
    second = _weight_grads_against_oracle(*args, split_k=4)
    unsplit = _weight_grads_against_oracle(*args, split_k=1)
    for a, b, c in zip(first, second, unsplit):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)


def test_split_k_short_batch_and_bad_values(kernel_device):
    # Fewer rows than slices: the launcher uses as many slices as there are row blocks.
    _weight_grads_against_oracle(5, 3, 4, torch.float32, True, "relu", kernel_device, split_k=8)
    x = torch.randn(4, 3, device=kernel_device)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="split_k"):
            kernels.fa_linear_backward_weight(torch.randn(4, 2, device=kernel_device), None, x, "identity",
                                              split_k=bad)


def test_autotune_never_runs_under_the_interpreter(kernel_device, monkeypatch):
    if not launchers.INTERPRETED:
        pytest.skip("checks the interpreter path")
    monkeypatch.setattr(autotune, "AUTOTUNE", True)
    monkeypatch.setattr(autotune, "TUNE_MIN_MACS", 1)

    def fail(*args, **kwargs):
        raise AssertionError("autotuning ran under the interpreter")

    monkeypatch.setattr(autotune.TUNER, "choose", fail)
    check_against_oracle((40,), 24, 12, torch.float32, True, "relu")


# --------------------------------------------- every kernel variant: TMA, split forward, stored δ

# Row strides of 48 and 40 elements are 16-byte aligned in fp32 and fp16: tensor descriptors apply.
VARIANT_SHAPE = (70, 48, 40)  # M, in_features, out_features


def _layer_with_configs(x, weight, b, feedback, grad_y, activation, forward=None, backward_input=None,
                        backward_weight=None, store_delta=False):
    """y and the three gradients from the launchers with explicit configs (None: the plan's own)."""
    store_extra = fa_triton.rules.activations.saves_extra(activation, 0.01)
    y, extra = kernels.fa_linear_forward(x, weight, b, activation, 0.01, store_extra, config=forward)
    saved = None if activation == "identity" else (extra if store_extra else y)
    delta = torch.empty(grad_y.shape, dtype=x.dtype, device=x.device) if store_delta else None
    grad_x = kernels.fa_linear_backward_input(grad_y, saved, feedback, activation, 0.01, config=backward_input,
                                              delta_out=delta)
    if store_delta:
        grad_w, grad_b = kernels.fa_linear_backward_weight(delta, None, x, "identity", 0.01, bias_grad=b is not None,
                                                           config=backward_weight)
    else:
        grad_w, grad_b = kernels.fa_linear_backward_weight(grad_y, saved, x, activation, 0.01,
                                                           bias_grad=b is not None, config=backward_weight)
    return {"y": y, "grad_x": grad_x, "grad_weight": grad_w, "grad_bias": grad_b}, delta


@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES)
@pytest.mark.parametrize("activation, store_delta", [("relu", False), ("gelu", True), ("sigmoid", True),
                                                     ("identity", False)])
@pytest.mark.parametrize("tma", [False, True], ids=["pointer", "tma"])
def test_kernel_variants_against_the_oracle(tma, activation, store_delta, dtype, kernel_device, launches):
    M, in_features, out_features = VARIANT_SHAPE
    x, weight, b, feedback, grad_y = make_inputs((M,), in_features, out_features, dtype, kernel_device,
                                                 activation=activation)
    expected = oracle(x, weight, b, feedback, grad_y, activation)
    bounds = layer_bounds(x, weight, b, feedback, grad_y, activation, dtype=dtype)
    torch_result = run_layer(reference_layer, x, weight, b, feedback, grad_y, activation)
    # Small tiles: several programs along every axis, partial tiles at every edge.
    config = LaunchConfig(32, 16, 16, tma=tma)
    result, delta = _layer_with_configs(x, weight, b, feedback, grad_y, activation, config, config,
                                        config.replace(split=2), store_delta)
    assert_backends_parity(result, torch_result, expected, dtype, bounds)
    names = [name for name, _ in launches]
    suffix = "_tma_kernel" if tma else "_kernel"
    assert {"forward" + suffix, "backward_input" + suffix, "backward_weight" + suffix, "split_sum_kernel"} <= set(names)
    if store_delta:
        # δ as the dot uses it: g ⊙ f'(z) rounded to the operand dtype (z itself was rounded too).
        true_delta = local_error(x, weight, b, grad_y, activation)[1]
        assert_parity(delta, true_delta, dtype, bounds=bounds["delta"], name="stored delta")


@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES)
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_forward_split_k_parity(activation, dtype, kernel_device, launches):
    # K = 48 in 16-wide steps, cut into 3 slices whose fp32 sums one epilogue kernel adds in order.
    M, in_features, out_features = VARIANT_SHAPE
    x, weight, b, feedback, grad_y = make_inputs((M,), in_features, out_features, dtype, kernel_device,
                                                 activation=activation)
    expected = oracle(x, weight, b, feedback, grad_y, activation)
    bounds = layer_bounds(x, weight, b, feedback, grad_y, activation, dtype=dtype)
    torch_result = run_layer(reference_layer, x, weight, b, feedback, grad_y, activation)
    split = LaunchConfig(32, 16, 16, split=3)
    result, _ = _layer_with_configs(x, weight, b, feedback, grad_y, activation, forward=split)
    assert_backends_parity(result, torch_result, expected, dtype, bounds)
    forward_grids = [grid for name, grid in launches if name == "forward_kernel"]
    assert forward_grids[0][1] == 3 and "forward_split_epilogue_kernel" in [name for name, _ in launches]
    again, _ = _layer_with_configs(x, weight, b, feedback, grad_y, activation, forward=split)
    assert torch.equal(again["y"], result["y"])  # fixed order: bitwise reproducible


@pytest.mark.parametrize("tma", [False, True], ids=["pointer", "tma"])
def test_forward_epilogue_in_halves(tma, kernel_device):
    # gelu on a 128x256 tile runs its epilogue on two column halves (registers on a GPU): y and
    # f'(z) must land in the right columns, partial tiles included (N = 300: a full and a partial tile).
    x, weight, b, _, _ = make_inputs((130,), 32, 300, torch.float32, kernel_device, activation="gelu")
    y, extra = kernels.fa_linear_forward(x, weight, b, "gelu", 0.01, True, config=LaunchConfig(128, 256, 16, tma=tma))
    z = x.double() @ weight.double().t() + b.double()
    y_true, fprime = activation_and_derivative(z, "gelu", 0.01)
    torch.testing.assert_close(y.double(), y_true, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(extra.double(), fprime, rtol=1e-5, atol=1e-5)


def test_tma_falls_back_to_pointers_for_misaligned_data(kernel_device, launches):
    # A view starting one element into its storage is not 16-byte aligned: same plan, pointer kernel.
    M, in_features, out_features = VARIANT_SHAPE
    x, weight, b, feedback, grad_y = make_inputs((M,), in_features, out_features, torch.float32, kernel_device)
    shifted = torch.empty(M * in_features + 1, device=kernel_device)[1:].view(M, in_features).copy_(x)
    config = LaunchConfig(32, 16, 16, tma=True)
    aligned, _ = kernels.fa_linear_forward(x, weight, b, "relu", config=config)
    misaligned, _ = kernels.fa_linear_forward(shifted, weight, b, "relu", config=config)
    assert [name for name, _ in launches] == ["forward_tma_kernel", "forward_kernel"]
    torch.testing.assert_close(misaligned, aligned, rtol=1e-6, atol=1e-6)


def test_tma_config_on_a_layout_it_cannot_address(kernel_device):
    # in_features = 7: fp32 rows of 28 bytes are not 16-byte aligned.
    x, weight, b, _, _ = make_inputs((5,), 7, 8, torch.float32, kernel_device)
    with pytest.raises(ValueError, match="tensor-descriptor.*forward.*tma=False"):
        kernels.fa_linear_forward(x, weight, b, "relu", config=LaunchConfig(16, 16, 16, tma=True))


@pytest.mark.parametrize("activation, bias", [("tanh", True), ("relu", False), ("identity", True),
                                              ("identity", False)])
def test_layer_backward_forms_delta_once(activation, bias, kernel_device, launches):
    # One δ pass (none for the identity without grad_b), then one plain GEMM per gradient.
    check_against_oracle((33,), 45, 70, torch.float32, bias, activation)
    names = [name for name, _ in launches if name != "forward_kernel"]
    passes = 1 if activation != "identity" or bias else 0
    assert names.count("local_error_kernel") == passes
    assert names.count("backward_input_kernel") == names.count("backward_weight_kernel") == 1
    assert len(names) == passes + 2 + names.count("split_sum_kernel")


def test_launch_plans_are_cached_per_layout(kernel_device, monkeypatch):
    built = []
    build = plans.ForwardPlan.build
    monkeypatch.setattr(plans.ForwardPlan, "build", lambda key, args: built.append(key) or build(key, args))
    x = torch.randn(9, 12, device=kernel_device)
    weight, bias = torch.randn(5, 12, device=kernel_device), torch.randn(5, device=kernel_device)
    first, _ = kernels.fa_linear_forward(x, weight, bias, "relu")
    second, _ = kernels.fa_linear_forward(x.clone(), weight, bias, "relu")
    assert len(built) == 1 and torch.equal(first, second)
    kernels.fa_linear_forward(x.t().contiguous().t(), weight, bias, "relu")  # other strides: another plan
    kernels.fa_linear_forward(x[:4], weight, bias, "relu")  # another batch size
    kernels.fa_linear_forward(x, weight, None, "relu")  # no bias
    assert len(built) == 4


def test_out_arguments_are_checked(kernel_device):
    x = torch.randn(9, 12, device=kernel_device)
    weight = torch.randn(5, 12, device=kernel_device)
    with pytest.raises(ValueError, match=r"out must be a torch.float32 tensor of shape \(9, 5\)"):
        kernels.fa_linear_forward(x, weight, None, "relu", out=torch.empty(9, 6, device=kernel_device))
    grad_y = torch.randn(9, 5, device=kernel_device)
    with pytest.raises(ValueError, match="delta_out must have a unit column stride"):
        kernels.fa_linear_backward_input(grad_y, None, weight, "identity",
                                         delta_out=torch.empty(5, 9, device=kernel_device).t())
    with pytest.raises(ValueError, match=r"out\[0\]"):
        kernels.fa_linear_backward_weight(grad_y, None, x, "identity", out=(torch.empty(5, 11), torch.empty(5)))
    grad_w, grad_b = torch.empty(5, 12, device=kernel_device), torch.empty(5, device=kernel_device)
    assert kernels.fa_linear_backward_weight(grad_y, None, x, "identity", out=(grad_w, grad_b))[0] is grad_w
    torch.testing.assert_close(grad_w, grad_y.t() @ x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_b, grad_y.sum(0), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- CUDA only

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_cuda_every_autotune_candidate(dtype):
    # Each config the tuner may pick must be correct, not only the one that wins on this GPU.
    # Sizes are multiples of 16 (as the benchmarks' are, so their compiled kernels are reused)
    # but not of the tiles, so every config still has partial tiles to mask.
    M, in_features, out_features = 1040, 784, 528
    x, weight, b, feedback, grad_y = make_inputs((M,), in_features, out_features, dtype, "cuda")
    expected = oracle(x, weight, b, feedback, grad_y, "relu")
    bounds = layer_bounds(x, weight, b, feedback, grad_y, "relu", dtype=dtype)
    torch_result = run_layer(reference_layer, x, weight, b, feedback, grad_y, "relu")
    assert_parity(torch_result, expected, dtype, bounds=bounds, name="reference (backend='torch')")
    sms = tuning.sm_count(torch.device("cuda"))
    tma = tuning.tma_supported(torch.device("cuda"))
    candidates = {
        "forward": tuning.candidate_configs("forward", M, out_features, in_features, dtype, sms, tma=tma),
        "backward_input": tuning.candidate_configs("backward_input", M, in_features, out_features, dtype, sms,
                                                   tma=tma),
        "backward_weight": tuning.candidate_configs("backward_weight", out_features, in_features, M, dtype, sms,
                                                    tma=tma),
    }
    for i in range(max(len(c) for c in candidates.values())):
        pick = {k: c[min(i, len(c) - 1)] for k, c in candidates.items()}
        try:
            y, _ = kernels.fa_linear_forward(x, weight, b, "relu", config=pick["forward"])
            grad_x = kernels.fa_linear_backward_input(grad_y, y, feedback, "relu", config=pick["backward_input"])
            grad_w, grad_b = kernels.fa_linear_backward_weight(grad_y, y, x, "relu", config=pick["backward_weight"])
        except Exception as err:  # noqa: BLE001
            if "OutOfResources" in type(err).__name__ or "shared memory" in str(err):
                continue  # the tuner skips configs this GPU cannot hold
            raise
        result = {"y": y, "grad_x": grad_x, "grad_weight": grad_w, "grad_bias": grad_b}
        assert_parity(result, expected, dtype, bounds=bounds, name=f"candidate {pick}")


@pytest.mark.cuda
def test_cuda_autotuned_path(monkeypatch, tmp_path):
    monkeypatch.setattr(autotune, "AUTOTUNE", True)
    monkeypatch.setattr(autotune, "TUNER", autotune.Tuner(directory=tmp_path))
    check_against_oracle((2000,), 784, 128, torch.bfloat16, True, "relu", device="cuda")
    keys = set(autotune.TUNER.entries)
    assert {k[1][0] for k in keys} == {"forward", "backward_input", "backward_weight"}
    check_against_oracle((1500,), 784, 128, torch.bfloat16, True, "relu", device="cuda")  # same 2048 bucket
    assert set(autotune.TUNER.entries) == keys
    assert list(tmp_path.glob("*.json")), "the choices were not written to the disk cache"


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_split_k_long_batch(dtype):
    # The tutorial's last layer at batch 8192: one output tile, so the batch is split.
    first = _weight_grads_against_oracle(8192, 64, 10, dtype, True, "identity", "cuda", split_k=64)
    second = _weight_grads_against_oracle(8192, 64, 10, dtype, True, "identity", "cuda", split_k=64)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    _weight_grads_against_oracle(8192, 784, 128, dtype, True, "relu", "cuda")  # tuned or heuristic split


def test_strided_and_expanded_bias(kernel_device):
    # The kernels read bias with a unit stride: the launcher makes it so (a view of every other
    # element, an expanded scalar), and refuses a strided grad_b output.
    x, weight, _, _, _ = make_inputs((9,), 12, 5, torch.float32, kernel_device)
    expected_from = lambda b: torch.relu(x @ weight.t() + b)  # noqa: E731
    strided = torch.randn(10, device=kernel_device)[::2]
    expanded = torch.tensor(0.5, device=kernel_device).expand(5)
    for bias in (strided, expanded):
        y, _ = kernels.fa_linear_forward(x, weight, bias, "relu")
        torch.testing.assert_close(y, expected_from(bias), rtol=1e-5, atol=1e-5)
    grad_y = torch.randn(9, 5, device=kernel_device)
    with pytest.raises(ValueError, match="unit stride"):
        kernels.fa_linear_backward_weight(grad_y, None, x, "identity",
                                          out=(torch.empty(5, 12, device=kernel_device),
                                               torch.empty(10, device=kernel_device)[::2]))


def test_zero_in_features(kernel_device):
    # K = 0: y = f(b), grad_x and grad_W are empty, grad_b = Σ δ still (a grid of one K tile).
    x = torch.empty(6, 0, device=kernel_device)
    weight = torch.empty(4, 0, device=kernel_device)
    bias = torch.randn(4, device=kernel_device)
    grad_y = torch.randn(6, 4, device=kernel_device)
    y, _ = kernels.fa_linear_forward(x, weight, bias, "tanh")
    torch.testing.assert_close(y, torch.tanh(bias).expand(6, 4))
    grad_w, grad_b = kernels.fa_linear_backward_weight(grad_y, y, x, "tanh")
    assert grad_w.shape == (4, 0)
    torch.testing.assert_close(grad_b, (grad_y * (1 - y * y)).sum(0), rtol=1e-5, atol=1e-5)
    assert kernels.fa_linear_backward_input(grad_y, y, weight, "tanh").shape == (6, 0)


@pytest.mark.parametrize("method", fa_triton.METHODS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("M, in_features, out_features", [(6, 0, 4), (0, 5, 4), (0, 0, 3)],
                         ids=["empty-K", "empty-M", "empty-both"])
def test_empty_input_or_batch(M, in_features, out_features, activation, method, kernel_device):
    # in_features = 0 once gave garbage grad_b (0.78, 9.7e25) with relu: δ and grad_b must not
    # depend on the GEMMs running. Checked against the float64 oracle (B from the rule's
    # equations) within the fixed bounds, every rule.
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(out_features, in_features, generator=gen).to(kernel_device).requires_grad_(True)
    # |b| in [0.2, 1]: z = b stays away from relu's kink.
    bias = ((torch.rand(out_features, generator=gen) * 0.8 + 0.2)
            * (torch.randint(0, 2, (out_features,), generator=gen) * 2 - 1)).to(kernel_device).requires_grad_(True)
    feedback = torch.randn(out_features, in_features, generator=gen).to(kernel_device)
    rule_args = {"fa": dict(feedback=feedback), "wm": dict(feedback=feedback), "frsf": dict(feedback=feedback),
                 "kp": dict(feedback=feedback.requires_grad_(True)), "backprop": dict(feedback=None),
                 "usf": dict(feedback=None, feedback_scale=0.3),
                 "brsf": dict(feedback=None, feedback_scale=0.5, seed=11,
                              counter=torch.tensor([2], dtype=torch.int64, device=kernel_device))}[method]
    x = torch.randn(M, in_features, generator=gen).to(kernel_device).requires_grad_(True)
    grad_y = torch.randn(M, out_features, generator=gen).to(kernel_device)
    feedback_arg = rule_args.pop("feedback")
    y = fa_linear(x, weight, bias, feedback_arg, activation, method=method, backend="triton", **rule_args)
    y.backward(grad_y)
    B = oracle_feedback(method, weight, feedback, scale=rule_args.get("feedback_scale"), seed=rule_args.get("seed"),
                        counter=rule_args.get("counter"))
    expected = oracle(x, weight, bias, B, grad_y, activation)
    bounds = layer_bounds(x, weight, bias, B, grad_y, activation, dtype=torch.float32, method=method)
    result = {"y": y, "grad_x": x.grad, "grad_weight": weight.grad, "grad_bias": bias.grad}
    assert_parity(result, expected, torch.float32, bounds=bounds, name=method)
    assert torch.isfinite(bias.grad).all()
    assert weight.grad.shape == (out_features, in_features) and not weight.grad.any()
    assert x.grad.shape == (M, in_features)


def test_launchers_refuse_an_unknown_activation(kernel_device):
    # A misspelt activation once ran as the identity (the kernels' last branch).
    assert launchers.ACTIVATIONS == fa_triton.ACTIVATIONS
    x, weight = torch.randn(4, 3, device=kernel_device), torch.randn(2, 3, device=kernel_device)
    grad_y = torch.randn(4, 2, device=kernel_device)
    calls = [lambda: kernels.fa_linear_forward(x, weight, None, "rleu"),
             lambda: kernels.fa_linear_local_error(grad_y, grad_y, "rleu"),
             lambda: kernels.fa_linear_backward_input(grad_y, grad_y, weight, "rleu"),
             lambda: kernels.fa_linear_backward_weight(grad_y, grad_y, x, "rleu"),
             lambda: kernels.fa_linear_dfa_delta(grad_y, weight, None, "rleu")]
    for call in calls:
        with pytest.raises(ValueError, match="activation must be one of .* got 'rleu'"):
            call()
    with pytest.raises(ValueError, match="method must be one of .*usf.* got 'fa'"):
        kernels.fa_linear_feedback(weight, None, "fa")


@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("split", [1, 2, 3, 7])
def test_delta_pass_with_row_slices(split, activation, dtype, kernel_device, launches):
    # δ = g ⊙ f'(z) and grad_b = Σ_rows δ from the pass, its rows in `split` slices whose fp32
    # partial sums split_sum_kernel adds in order: against the equations in float64, within the
    # fixed bounds of a δ pass (local_error_bounds).
    gen = torch.Generator().manual_seed(split)
    z = torch.randn(53, 21, generator=gen, dtype=torch.float64)
    z = torch.where(z.abs() < 0.05, z + 0.1, z)  # away from relu's kink
    y, fprime = activation_and_derivative(z, activation, 0.01)
    saved = (fprime if activation == "gelu" else z if activation == "leaky_relu" else y).to(dtype).to(kernel_device)
    grad_y = torch.randn(53, 21, generator=gen, dtype=torch.float64).to(dtype).to(kernel_device)
    config = LaunchConfig(16, 16, 16, split=split)
    delta, grad_b = kernels.fa_linear_local_error(grad_y, saved, activation, 0.01, config=config)
    expected = grad_y.double() * fprime
    bounds = local_error_bounds(grad_y, z, activation, 0.01, dtype=dtype)
    assert_parity({"delta": delta, "grad_bias": grad_b}, {"delta": expected, "grad_bias": expected.sum(0)}, dtype,
                  bounds=bounds)
    names = [name for name, _ in launches]
    assert names.count("local_error_kernel") == 1 and names.count("split_sum_kernel") == (split > 1)
    again, again_b = kernels.fa_linear_local_error(grad_y, saved, activation, 0.01, config=config)
    assert torch.equal(again, delta) and torch.equal(again_b, grad_b)  # a fixed order: bitwise the same


# ------------------------------------------------------------------------- the fused narrow MLP
# Each y_l of the one launch against the float64 oracle of layer l applied to the kernel's own
# y_{l-1} (what it read, rounded to the storage dtype as the per-layer kernels store it), within
# that layer's fixed bounds: the chain's numbers are the per-layer kernels', without the launches.

# (M, K, widths): none a multiple of a block but the tutorial's, widths of 1 and 128, 2 to 4 layers.
MLP_SHAPES = [(1, 7, (1, 128)), (7, 50, (113, 9, 16)), (113, 17, (16, 1, 128, 3)), (64, 784, (128, 64, 10))]


def _mlp_inputs(M, K, widths, dtype, device, bias_pattern=(True, False, True, True), seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=gen)
    weights, biases, width = [], [], K
    for index, n in enumerate(widths):
        weights.append((torch.rand(n, width, generator=gen) * 2 - 1) / width ** 0.5)
        biases.append(torch.rand(n, generator=gen) - 0.5 if bias_pattern[index] else None)
        width = n
    cast = lambda t: None if t is None else t.to(dtype).to(device)  # noqa: E731
    return cast(x), [cast(w) for w in weights], [cast(b) for b in biases]


# A slope per layer, each its own: a layer given another's shows.
SLOPES = (0.3, 0.1, 0.2, 0.05)


def _assert_each_layer_within_bounds(x, weights, biases, activations, outputs, dtype):
    """fp32 with tf32 dots: the fused MLP takes fp32 only so (launchers.mlp_fusable)."""
    h = x
    for index, (weight, bias, activation, y) in enumerate(zip(weights, biases, activations, outputs)):
        grad_y = torch.zeros(y.shape, dtype=y.dtype, device=y.device)
        slope = SLOPES[index]
        expected = oracle(h, weight, bias, weight, grad_y, activation, slope)["y"]
        bounds = layer_bounds(h, weight, bias, weight.double(), grad_y, activation, slope, dtype=dtype,
                              tf32=dtype == torch.float32)["y"]
        assert_parity({"y": y}, {"y": expected}, dtype, bounds={"y": bounds}, name=f"y_{index + 1}")
        h = y


@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES)
@pytest.mark.parametrize("shape", MLP_SHAPES)
def test_fused_mlp_forward_against_the_oracle(shape, dtype, kernel_device, launches, fp32_matmul_precision):
    fp32_matmul_precision(True)
    M, K, widths = shape
    x, weights, biases = _mlp_inputs(M, K, widths, dtype, kernel_device)
    activations = [ACTIVATIONS[(i + len(widths)) % len(ACTIVATIONS)] for i in range(len(widths))]
    activations[1] = "leaky_relu"  # every layer's slope is read: see SLOPES
    assert kernels.mlp_fusable(x, weights, biases)
    outputs = kernels.fa_mlp_forward(x, weights, biases, activations, SLOPES[:len(widths)])
    assert [name for name, _ in launches] == ["mlp_forward_kernel"]
    assert [tuple(y.shape) for y in outputs] == [(M, n) for n in widths] and all(y.dtype == dtype for y in outputs)
    _assert_each_layer_within_bounds(x, weights, biases, activations, outputs, dtype)
    again = kernels.fa_mlp_forward(x, weights, biases, activations, SLOPES[:len(widths)])
    assert all(torch.equal(a, b) for a, b in zip(again, outputs))  # a fixed order: bitwise the same


def test_fused_mlp_takes_any_strides_an_out_tensor_and_a_config(kernel_device, fp32_matmul_precision):
    fp32_matmul_precision(True)
    x, weights, biases = _mlp_inputs(19, 33, (20, 12, 5), torch.float32, kernel_device)
    x_t = x.t().contiguous().t()  # column-major
    weights = [weights[0].t().contiguous().t(), weights[1], weights[2][:, :].t().contiguous().t()]
    out = torch.empty(19, 5, device=kernel_device)
    activations = ["leaky_relu", "leaky_relu", "leaky_relu"]
    outputs = kernels.fa_mlp_forward(x_t, weights, biases, activations, SLOPES[:3], out,
                                     config=LaunchConfig(16, 16, 16))
    assert outputs[-1] is out
    _assert_each_layer_within_bounds(x, weights, biases, activations, outputs, torch.float32)


def test_fused_mlp_empty_batch_and_what_it_refuses(kernel_device, fp32_matmul_precision):
    fp32_matmul_precision(True)
    x, weights, biases = _mlp_inputs(0, 6, (5, 4), torch.float32, kernel_device)
    outputs = kernels.fa_mlp_forward(x, weights, biases, ["relu"] * 2, [0.0] * 2)
    assert [tuple(y.shape) for y in outputs] == [(0, 5), (0, 4)]
    x, weights, biases = _mlp_inputs(3, 6, (5, 4, 3, 2), torch.float32, kernel_device)
    refused = {
        "five layers": (x, weights + [torch.randn(2, 2)], biases + [None]),
        "one layer": (x, weights[:1], biases[:1]),
        "129 wide": (x, [torch.randn(129, 6)] + [torch.randn(4, 129)], [None, None]),
        "not chaining": (x, [weights[0], weights[2]], [None, None]),
        "mixed dtypes": (x, [weights[0], weights[1].double()], [None, None]),
        "float64": (x.double(), [w.double() for w in weights], [None] * 4),
        "a bias of another width": (x, weights[:2], [None, torch.randn(5)]),
    }
    for why, (x_, weights_, biases_) in refused.items():
        assert not kernels.mlp_fusable(x_, weights_, biases_), why
        with pytest.raises(ValueError, match="fa_mlp_forward takes 2 to 4 chaining layers at most 128 wide"):
            kernels.fa_mlp_forward(x_, weights_, biases_, ["relu"] * len(weights_), [0.0] * len(weights_))
    with pytest.raises(ValueError, match="activation must be one of"):
        kernels.fa_mlp_forward(x, weights, biases, ["relu", "rleu", "relu", "relu"], [0.0] * 4)
    with pytest.raises(ValueError, match="one activation and negative slope per layer"):
        kernels.fa_mlp_forward(x, weights, biases, ["relu"] * 3, [0.0] * 4)
    half = (x.half(), [w.half() for w in weights], [b if b is None else b.half() for b in biases])
    assert kernels.mlp_fusable(x, weights, biases) and kernels.mlp_fusable(*half)
    fp32_matmul_precision(False)  # IEEE fp32 dots spill at these widths: not fused; 16-bit ones are
    assert not kernels.mlp_fusable(x, weights, biases) and kernels.mlp_fusable(*half)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", MLP_SHAPES + [(8192, 784, (128, 64, 10)), (1023, 128, (128, 128, 128, 128))], ids=str)
def test_cuda_fused_mlp_forward(shape, dtype, fp32_matmul_precision):
    """Compiled, in bf16 too (the interpreter has no bf16 arithmetic), at the heuristic's configs."""
    fp32_matmul_precision(True)
    M, K, widths = shape
    x, weights, biases = _mlp_inputs(M, K, widths, dtype, "cuda")
    activations = [ACTIVATIONS[(i + len(widths)) % len(ACTIVATIONS)] for i in range(len(widths))]
    activations[1] = "leaky_relu"
    outputs = kernels.fa_mlp_forward(x, weights, biases, activations, SLOPES[:len(widths)])
    _assert_each_layer_within_bounds(x, weights, biases, activations, outputs, dtype)


# Unit roundoffs of the fused kernels' arithmetic: fp32 accumulation, each dtype's storage, and
# the dots' inputs (tf32 operands for fp32; 16-bit operands enter the dot exactly).
U_ACC = 2.0 ** -24
U_STORE = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


def _u_in(dtype) -> float:
    return 2.0 ** -11 if dtype == torch.float32 else 0.0


def _dot_bound(a, b, dtype):
    """(a @ b in float64, a fixed bound on it as the kernels compute it: operands rounded to the
    dot's input, the a.shape[1] products summed in fp32, the result rounded to ``dtype``)."""
    exact = a.double() @ b.double()
    bound = (a.double().abs() @ b.double().abs()) * (2 * _u_in(dtype) + (a.shape[1] + 1) * U_ACC) \
        + U_STORE[dtype] * exact.abs() + 1e-30
    return exact, bound


def _step_bound(delta, feedback, y_below, activation, slope, dtype):
    """A fixed bound, from the rounding of ``dtype``, on δ_below = (δ B) ⊙ f'(y_below) computed
    as the kernel does: operands rounded to the dot's input (tf32 for fp32), products summed in
    fp32 over N_l terms, f' from y in fp32, the result rounded to ``dtype`` (first order)."""
    magnitude = delta.double().abs() @ feedback.double().abs()
    y = y_below.double()
    fprime = activation_and_derivative_from_y(y, activation, slope)
    e_fprime = 4 * U_ACC * (1 + y.abs() + y * y)
    exact = (delta.double() @ feedback.double()) * fprime
    return exact, magnitude * (fprime.abs() * (2 * _u_in(dtype) + (feedback.shape[0] + 2) * U_ACC) + e_fprime) \
        + U_STORE[dtype] * exact.abs() + 1e-30


def activation_and_derivative_from_y(y, activation, slope):
    """f'(z) read off y = f(z), as the kernels read it (relu-like: y > 0)."""
    if activation == "relu":
        return (y > 0).double()
    if activation == "leaky_relu":
        return torch.where(y > 0, 1.0, slope).double()
    if activation == "tanh":
        return 1 - y * y
    if activation == "sigmoid":
        return y * (1 - y)
    return torch.ones_like(y)


@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES)
@pytest.mark.parametrize("shape", MLP_SHAPES)
def test_fused_mlp_backward_against_the_oracle(shape, dtype, kernel_device, launches, fp32_matmul_precision):
    fp32_matmul_precision(True)
    _check_fused_mlp_backward(shape, dtype, kernel_device, launches)


def _check_fused_mlp_backward(shape, dtype, device, launches=None):
    """Each δ_{l-1} against (δ_l B_l) ⊙ f'(y_{l-1}) in float64 from the kernel's own stored δ_l,
    within fixed bounds; grad_b against Σ_rows of the oracle's δ; grad_x against δ_1 B_1."""
    kernel_device = device
    M, K, widths = shape
    gen = torch.Generator().manual_seed(len(widths))
    activations = ["relu", "leaky_relu", "tanh", "sigmoid"][:len(widths) - 1] + ["identity"]
    outputs = [torch.rand(M, n, generator=gen).to(dtype).to(kernel_device) for n in widths]
    outputs = [y * 2 - 1 if a in ("relu", "leaky_relu") else y for y, a in zip(outputs, activations)]
    feedbacks = [(torch.rand(n, k, generator=gen) * 2 - 1).to(dtype).to(kernel_device)
                 for n, k in zip(widths, (K,) + widths[:-1])]
    grad_y = torch.randn(M, widths[-1], generator=gen).to(dtype).to(kernel_device)
    bias_grads = [True, False, True, True][:len(widths)]
    deltas, grad_bs, grad_x = kernels.fa_mlp_backward(grad_y, outputs[:-1] + [None], feedbacks, activations,
                                                      SLOPES[:len(widths)], True, bias_grads)
    if launches is not None:
        assert [name for name, _ in launches] == ["mlp_backward_kernel"] + ["split_sum_kernel"]
    u_store = U_STORE[dtype]
    torch.testing.assert_close(deltas[-1], grad_y)  # the identity at the top: δ_L = g
    for index in range(len(widths) - 1, 0, -1):
        exact, bound = _step_bound(deltas[index], feedbacks[index], outputs[index - 1], activations[index - 1],
                                   SLOPES[index - 1], dtype)
        assert_parity({"delta": deltas[index - 1]}, {"delta": exact}, dtype, bounds={"delta": bound},
                      name=f"delta_{index}")
    for index, wanted in enumerate(bias_grads):
        if not wanted:
            assert grad_bs[index] is None
            continue
        # Σ over rows of the fp32 δ before its rounding (each within u_store of the stored δ), in
        # fp32, then rounded to the dtype.
        rows = deltas[index].shape[0]
        exact = deltas[index].double().sum(0)
        absolute = deltas[index].double().abs().sum(0)
        bound = (u_store + (rows + 1) * U_ACC) * absolute + u_store * exact.abs()
        assert_parity({"grad_bias": grad_bs[index]}, {"grad_bias": exact}, dtype, bounds={"grad_bias": bound},
                      name=f"grad_b_{index + 1}")
    exact, bound = _dot_bound(deltas[0], feedbacks[0], dtype)
    assert_parity({"grad_x": grad_x}, {"grad_x": exact}, dtype, bounds={"grad_x": bound})


@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES)
@pytest.mark.parametrize("shape", MLP_SHAPES)
def test_fused_mlp_weight_grads_against_the_oracle(shape, dtype, kernel_device, launches, fp32_matmul_precision):
    fp32_matmul_precision(True)
    _check_fused_mlp_weight_grads(shape, dtype, kernel_device, launches)


def _check_fused_mlp_weight_grads(shape, dtype, kernel_device, launches=None):
    """Every grad_W_l = δ_lᵀ h_{l-1} from one grouped launch, against float64 within fixed bounds:
    operands rounded to the dot's input (tf32 for fp32), M products summed in fp32, the result
    rounded to the dtype. h_0 read through strides (column-major); a layer not wanted is skipped."""
    M, K, widths = shape
    gen = torch.Generator().manual_seed(M)
    deltas = [torch.randn(M, n, generator=gen).to(dtype).to(kernel_device) for n in widths]
    inputs = [torch.randn(K, M, generator=gen).to(dtype).to(kernel_device).t()]
    inputs += [torch.randn(M, n, generator=gen).to(dtype).to(kernel_device) for n in widths[:-1]]
    for wanted in ([True] * len(widths), [True, False, True, True][:len(widths)]):
        if launches is not None:
            launches.clear()
        grads = kernels.fa_mlp_weight_grads(deltas, inputs, wanted)
        if launches is not None:
            assert [name for name, _ in launches] == ["mlp_weight_grad_kernel"]
        for index, (delta, h, grad, want) in enumerate(zip(deltas, inputs, grads, wanted)):
            if not want:
                assert grad is None
                continue
            exact, bound = _dot_bound(delta.t(), h, dtype)
            assert_parity({"grad_weight": grad}, {"grad_weight": exact}, dtype, bounds={"grad_weight": bound},
                          name=f"grad_W_{index + 1}")
        assert all(torch.equal(a, b) for a, b in zip(kernels.fa_mlp_weight_grads(deltas, inputs, wanted), grads)
                   if a is not None)


def test_fused_mlp_weight_grads_empty_batch_and_bad_operands(kernel_device):
    deltas = [torch.zeros(0, 5, device=kernel_device), torch.zeros(0, 3, device=kernel_device)]
    inputs = [torch.zeros(0, 4, device=kernel_device), torch.zeros(0, 5, device=kernel_device)]
    grads = kernels.fa_mlp_weight_grads(deltas, inputs, [True, True])
    assert [tuple(g.shape) for g in grads] == [(5, 4), (3, 5)] and all(not g.any() for g in grads)
    with pytest.raises(ValueError, match="contiguous δ"):
        kernels.fa_mlp_weight_grads([torch.randn(5, 3, device=kernel_device).t()], [torch.randn(3, 2)], [True])
    with pytest.raises(ValueError, match="takes 1 to 4 layers"):
        kernels.fa_mlp_weight_grads(deltas * 3, inputs * 3, [True] * 6)


def test_fused_mlp_int64_offsets_path(kernel_device, monkeypatch, fp32_matmul_precision):
    # As test_int64_offsets_path: the int64 indexing of all three fused kernels, forced on a small chain.
    fp32_matmul_precision(True)
    x, weights, biases = _mlp_inputs(19, 33, (20, 12, 5), torch.float32, kernel_device)
    activations = ["relu", "leaky_relu", "identity"]
    expected = kernels.fa_mlp_forward(x, weights, biases, activations, SLOPES[:3])
    grad_y = torch.randn(19, 5).to(kernel_device)
    feedbacks = [torch.randn(20, 33).to(kernel_device), *weights[1:]]
    expected_back = kernels.fa_mlp_backward(grad_y, expected[:-1] + [None], feedbacks, activations, SLOPES[:3], True,
                                            [True] * 3)
    expected_w = kernels.fa_mlp_weight_grads(expected_back[0], [x, *expected[:-1]], [True] * 3)
    monkeypatch.setattr(plans, "needs_int64", lambda *tensors: True)
    outputs = kernels.fa_mlp_forward(x, weights, biases, activations, SLOPES[:3])
    back = kernels.fa_mlp_backward(grad_y, outputs[:-1] + [None], feedbacks, activations, SLOPES[:3], True, [True] * 3)
    grads_w = kernels.fa_mlp_weight_grads(back[0], [x, *outputs[:-1]], [True] * 3)
    for got, want in zip([*outputs, *back[0], *back[1], back[2], *grads_w],
                         [*expected, *expected_back[0], *expected_back[1], expected_back[2], *expected_w]):
        assert torch.equal(got, want)


def test_launchers_refuse_operands_that_do_not_fit(kernel_device):
    # Each kernel reads an operand by the sizes of the others: a misfit would read out of bounds.
    d = kernel_device
    calls = {
        "weight": lambda: kernels.fa_linear_forward(torch.randn(4, 16, device=d), torch.randn(8, 12, device=d), None,
                                                    "relu"),
        "bias": lambda: kernels.fa_linear_forward(torch.randn(4, 16, device=d), torch.randn(8, 16, device=d),
                                                  torch.randn(7, device=d), "relu"),
        "feedback": lambda: kernels.fa_linear_backward_input(torch.randn(4, 8, device=d), None,
                                                             torch.randn(6, 16, device=d), "identity"),
        "x": lambda: kernels.fa_linear_backward_weight(torch.randn(4, 8, device=d), None, torch.randn(5, 16, device=d),
                                                       "identity", bias_grad=False),
        "saved": lambda: kernels.fa_linear_local_error(torch.randn(4, 8, device=d), torch.randn(4, 7, device=d),
                                                       "relu"),
        "feedback ": lambda: kernels.fa_linear_dfa_delta(torch.randn(4, 10, device=d), torch.randn(9, 16, device=d),
                                                         torch.randn(4, 16, device=d), "relu"),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match=rf"^{name.strip()} must have shape \("):
            call()


def test_fused_mlp_backward_refuses_what_does_not_fit(kernel_device, fp32_matmul_precision):
    fp32_matmul_precision(True)
    d = kernel_device
    grad_y, outputs = torch.randn(5, 3, device=d), [torch.rand(5, 4, device=d), None]
    good = [torch.randn(4, 6, device=d), torch.randn(3, 4, device=d)]
    assert kernels.mlp_backward_fusable(grad_y, torch.randn(5, 6, device=d), outputs)
    assert not kernels.mlp_backward_fusable(grad_y, torch.randn(4, 6, device=d), outputs)  # x of another batch
    assert not kernels.mlp_backward_fusable(grad_y, torch.randn(5, 6, device=d), [torch.rand(5, 129, device=d), None])
    bad = {
        "B_2 of another width": [good[0], torch.randn(3, 5, device=d)],
        "B_1 missing for grad_x": [None, good[1]],
        "B_1 of another dtype": [good[0].half(), good[1]],
    }
    for why, feedbacks in bad.items():
        with pytest.raises(ValueError, match="fa_mlp_backward takes 2 to 4 chaining layers"):
            kernels.fa_mlp_backward(grad_y, outputs, feedbacks, ["relu", "identity"], [0.0, 0.0], True, [True, True])
            pytest.fail(f"not refused: {why}")
    deltas, _, grad_x = kernels.fa_mlp_backward(grad_y, outputs, good, ["relu", "identity"], [0.0, 0.0], True,
                                                [True, True])
    assert grad_x.shape == (5, 6) and [tuple(t.shape) for t in deltas] == [(5, 4), (5, 3)]



@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", MLP_SHAPES + [(8192, 784, (128, 64, 10))], ids=str)
def test_cuda_fused_mlp_backward_and_weight_grads(shape, dtype, fp32_matmul_precision):
    """Compiled, in bf16 too, at the heuristic's configs."""
    fp32_matmul_precision(True)
    _check_fused_mlp_backward(shape, dtype, "cuda")
    _check_fused_mlp_weight_grads(shape, dtype, "cuda")


# --------------------------------------------------------------------------------- stacked

STACKED_MODELS = 3
STACKED_CONFIG = LaunchConfig(16, 16, 16, 4, 1)


def _stacked(shape, layout, gen, device, *, positive=False):
    """[E, *shape] of STACKED_MODELS models laid out as ``layout``: "contiguous"; "inner" (the
    models' axis not the outermost in memory: what vmap's movedim gives); "shared" (one tensor
    for every model, stride 0 between them)."""
    if layout == "shared":
        t = torch.randn(*shape, generator=gen).expand(STACKED_MODELS, *shape)
    elif layout == "inner":
        t = torch.randn(*shape, STACKED_MODELS, generator=gen).movedim(-1, 0)
    else:
        t = torch.randn(STACKED_MODELS, *shape, generator=gen)
    return (t.abs() + 0.2 if positive else t).to(device)


@pytest.mark.parametrize("layout", ["contiguous", "inner", "shared"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", [(1, 7, 17), (7, 17, 5)], ids=lambda s: "x".join(map(str, s)))
def test_stacked_launches_are_each_models_own_launch(shape, activation, layout, kernel_device, launches):
    # E models' layer in one launch per job, each model's result bitwise what its own launch
    # with the same config gives (the model is only the grid's third axis), whatever the layout.
    M, K, N = shape
    gen = torch.Generator().manual_seed(7)
    x, weight = _stacked((M, K), layout, gen, kernel_device), _stacked((N, K), "contiguous", gen, kernel_device)
    bias, grad_y = _stacked((N,), layout, gen, kernel_device), _stacked((M, N), layout, gen, kernel_device)
    store = fa_triton.rules.activations.saves_extra(activation, 0.1)
    y, extra = kernels.fa_stacked_forward(x, weight, bias, activation, 0.1, store, config=STACKED_CONFIG)
    saved = extra if store else y
    one_pass = LaunchConfig(64, 64, 16, split=1)  # the δ pass's: one slice of rows, as stacked
    delta, grad_b = kernels.fa_stacked_local_error(grad_y, saved, activation, 0.1, config=one_pass)
    grad_x = kernels.fa_stacked_backward_input(delta, weight, config=STACKED_CONFIG)
    grad_w = kernels.fa_stacked_backward_weight(delta, x, config=STACKED_CONFIG)
    assert [(name, grid[-1]) for name, grid in launches] == [
        ("forward_kernel", STACKED_MODELS), ("local_error_kernel", STACKED_MODELS),
        ("backward_input_kernel", STACKED_MODELS), ("backward_weight_kernel", STACKED_MODELS)]
    for e in range(STACKED_MODELS):
        y_e, extra_e = kernels.fa_linear_forward(x[e], weight[e], bias[e], activation, 0.1, store,
                                                 config=STACKED_CONFIG)
        delta_e, grad_b_e = kernels.fa_linear_local_error(grad_y[e], saved[e], activation, 0.1, config=one_pass)
        assert torch.equal(y[e], y_e) and (extra is None) == (extra_e is None)
        assert extra is None or torch.equal(extra[e], extra_e)
        assert torch.equal(delta[e], delta_e) and torch.equal(grad_b[e], grad_b_e)
        assert torch.equal(grad_x[e], kernels.fa_linear_backward_input(delta[e], None, weight[e], "identity",
                                                                      config=STACKED_CONFIG))
        assert torch.equal(grad_w[e], kernels.fa_linear_backward_weight(delta[e], None, x[e], "identity", 0.0, False,
                                                                       config=STACKED_CONFIG)[0])


@pytest.mark.parametrize("method", ["fa", "usf", "frsf", "brsf"])
def test_stacked_layer_matches_the_oracle(method, kernel_device):
    # Each model's y, grad_x, grad_W and grad_b against the float64 oracle of its own layer (B
    # from the rule's equations), within the fp32 bounds; the stacked config is the heuristic's.
    M, K, N = 7, 17, 13
    gen = torch.Generator().manual_seed(8)
    x, weight = _stacked((M, K), "contiguous", gen, kernel_device), _stacked((N, K), "contiguous", gen, kernel_device)
    bias, grad_y = _stacked((N,), "contiguous", gen, kernel_device), _stacked((M, N), "contiguous", gen, kernel_device)
    magnitudes = _stacked((N, K), "contiguous", gen, kernel_device)
    counter = torch.tensor([4], dtype=torch.int64, device=kernel_device)
    y, _ = kernels.fa_stacked_forward(x, weight, bias, "tanh")
    delta, grad_b = kernels.fa_stacked_local_error(grad_y, y, "tanh")
    if method == "fa":
        feedback = magnitudes
    else:
        feedback = kernels.fa_stacked_feedback(weight, magnitudes if method == "frsf" else None, method,
                                               feedback_scale=0.3, seed=5, counter=counter)
    grad_x = kernels.fa_stacked_backward_input(delta, feedback)
    grad_w = kernels.fa_stacked_backward_weight(delta, x)
    for e in range(STACKED_MODELS):
        B = oracle_feedback(method, weight[e], None if method in ("usf", "brsf") else magnitudes[e], scale=0.3,
                            seed=5, counter=counter)
        expected = oracle(x[e], weight[e], bias[e], B, grad_y[e], "tanh")
        bounds = layer_bounds(x[e], weight[e], bias[e], B, grad_y[e], "tanh", dtype=torch.float32, method=method)
        result = {"y": y[e], "grad_x": grad_x[e], "grad_weight": grad_w[e], "grad_bias": grad_b[e]}
        assert_parity(result, expected, torch.float32, bounds=bounds, name=f"{method} model {e}")


def test_stacked_launchers_refuse_misfits(kernel_device):
    x, weight = torch.randn(2, 4, 3, device=kernel_device), torch.randn(2, 5, 3, device=kernel_device)
    delta = torch.randn(2, 4, 5, device=kernel_device)
    with pytest.raises(ValueError, match=r"x must have 3 dimensions \(the models first\), got shape \(4, 3\)"):
        kernels.fa_stacked_forward(x[0], weight, None, "relu")
    with pytest.raises(ValueError, match=r"weight must have shape \(2, 5, 3\) to fit the other operands, got \(3, 5, "):
        kernels.fa_stacked_forward(x, torch.randn(3, 5, 3, device=kernel_device), None, "relu")
    with pytest.raises(ValueError, match=r"bias must have shape \(2, 5\)"):
        kernels.fa_stacked_forward(x, weight, torch.randn(5, device=kernel_device), "relu")
    with pytest.raises(ValueError, match="activation must be one of"):
        kernels.fa_stacked_local_error(delta, delta, "rleu")
    with pytest.raises(ValueError, match=r"feedback must have shape \(2, 5, 3\)"):
        kernels.fa_stacked_backward_input(delta, torch.randn(2, 4, 3, device=kernel_device))
    with pytest.raises(TypeError, match="delta and x must have one dtype"):
        kernels.fa_stacked_backward_weight(delta.double(), x)
    with pytest.raises(ValueError, match="neither tensor descriptors nor split reductions"):
        kernels.fa_stacked_backward_weight(delta, x, config=LaunchConfig(16, 16, 16, split=2))
    with pytest.raises(ValueError, match="no split reduction"):
        kernels.fa_stacked_local_error(delta, delta, "relu", config=LaunchConfig(16, 16, 16, split=2))
    with pytest.raises(ValueError, match="method must be one of"):
        kernels.fa_stacked_feedback(weight, None, "fa")
    many = weight[:1].expand(kernels.launchers.MAX_STACKED_MODELS + 1, 5, 3)  # a view: nothing allocated
    with pytest.raises(ValueError, match=r"at most 65535 models .*got weight of shape \(65536, 5, 3\)"):
        kernels.fa_stacked_feedback(many, None, "usf")
