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
from oracle import assert_parity, assert_within_bounds, make_inputs, oracle, run_layer, tf32_bounds

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


def test_fp32_dot_follows_pytorchs_tf32_switches(fp32_matmul_precision):
    fp32_matmul_precision(False, switch="allow_tf32")
    assert kernel_module._dot_precision(torch.float32) == "ieee"
    fp32_matmul_precision(True, switch="allow_tf32")
    assert kernel_module._dot_precision(torch.float32) == "tf32"
    assert kernel_module._dot_precision(torch.float16) == "tf32"  # no effect on half types
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        # The newer switch (torch >= 2.9); once it is set, reading allow_tf32 raises.
        fp32_matmul_precision(False, switch="fp32_precision")
        assert kernel_module._dot_precision(torch.float32) == "ieee"
        fp32_matmul_precision(True, switch="fp32_precision")
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
    with the suite's tolerance policy (<= 2x PyTorch's own error + floor). Returns them."""
    from oracle import FLOOR, max_error

    x, weight, b, feedback, grad_y = make_inputs((M,), in_features, out_features, dtype, device, bias=bias,
                                                 activation=activation)
    expected = oracle(x, weight, b, feedback, grad_y, activation)
    torch_result = run_layer(reference_layer, x, weight, b, feedback, grad_y, activation)
    store_preact = fa_triton.activations.saves_preactivation(activation, 0.01)
    y, preact = kernels.fa_linear_forward(x, weight, b, activation, 0.01, store_preact)
    saved = None if activation == "identity" else (preact if store_preact else y)
    grad_w, grad_b = kernels.fa_linear_backward_weight(grad_y, saved, x, activation, 0.01, bias_grad=bias,
                                                       **launch_kwargs)
    for name, value in (("grad_weight", grad_w), ("grad_bias", grad_b)):
        if expected[name] is None:
            assert value is None
            continue
        assert value.dtype == dtype and value.shape == expected[name].shape
        scale = max(1.0, expected[name].abs().max().item())
        bound = 2 * max_error(torch_result[name], expected[name]) + FLOOR[dtype] * scale
        err = max_error(value, expected[name])
        assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g}"
    return grad_w, grad_b


@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("activation", ["relu", "gelu", "identity"])
@pytest.mark.parametrize("split_k", [2, 3, 7])
def test_split_k_parity(split_k, activation, bias, dtype, kernel_device, monkeypatch):
    # 300 rows = 5 blocks of the interpreter's 64-row steps: 2, 3 and 7 slices (7 is cut to 5).
    used = []
    reduce_splits = kernel_module._reduce_splits
    monkeypatch.setattr(kernel_module, "_reduce_splits",
                        lambda partial, *a: (used.append(partial.shape[0]), reduce_splits(partial, *a))[1])
    _weight_grads_against_oracle(300, 20, 7, dtype, bias, activation, kernel_device, split_k=split_k)
    assert used, "the split-K path did not run"
    if kernel_module.INTERPRETED:
        assert used == [kernel_module._split_plan(300, split_k, 64)[0]]


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


def test_split_plan_covers_the_batch():
    for batch in (1, 15, 16, 17, 300, 8192, 10_000):
        for split in (1, 2, 3, 7, 64, 1000):
            for block in (16, 32, 64):
                splits, rows = kernel_module._split_plan(batch, split, block)
                assert rows % block == 0 and 1 <= splits <= split
                assert (splits - 1) * rows < batch <= splits * rows  # every row once, no empty slice


def test_autotune_never_runs_under_the_interpreter(kernel_device, monkeypatch):
    if not kernel_module.INTERPRETED:
        pytest.skip("checks the interpreter path")
    monkeypatch.setattr(kernel_module, "_AUTOTUNE", True)
    monkeypatch.setattr(kernel_module, "_TUNE_MIN_MACS", 1)

    def fail(*args, **kwargs):
        raise AssertionError("autotuning ran under the interpreter")

    monkeypatch.setattr(kernel_module, "_autotune", fail)
    check_against_oracle((40,), 24, 12, torch.float32, True, "relu")


@pytest.fixture
def as_compiled(monkeypatch):
    """Config selection as on a GPU with the given number of SMs; the heuristic's cache is
    cleared before and after, so no compiled-GPU config leaks into interpreter runs."""
    def setup(sms=132):
        monkeypatch.setattr(kernel_module, "INTERPRETED", False)
        monkeypatch.setattr(kernel_module, "_sm_count", lambda device: sms)
        kernel_module._heuristic_config.cache_clear()

    yield setup
    kernel_module._heuristic_config.cache_clear()


@pytest.mark.parametrize("sms", [132, 108, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "kernel, rows, cols, red",
    [("forward", 8192, 8192, 8192), ("forward", 64, 128, 784), ("backward_input", 8192, 784, 128),
     ("backward_weight", 128, 784, 8192), ("backward_weight", 10, 64, 8192), ("backward_weight", 64, 128, 64),
     ("backward_weight", 1, 1, 1)],
)
def test_candidate_configs(kernel, rows, cols, red, dtype, sms, as_compiled):
    as_compiled(sms)
    configs = kernel_module._candidate_configs(kernel, rows, cols, red, dtype, sms, bias_grad=True)
    heuristic = kernel_module._heuristic_config(kernel, rows, cols, red, dtype, sms, True)
    assert configs[0] == heuristic
    assert len(configs) == len({tuple(sorted(c.items())) for c in configs}), "duplicate candidates"
    tiles = {(c["BLOCK_ROWS"], c["BLOCK_COLS"], c["BLOCK_RED"], c["num_warps"], c["num_stages"]) for c in configs}
    assert len(tiles) <= kernel_module._MAX_TILE_CANDIDATES  # each tile is one compile
    cap_red = 32 if dtype == torch.float32 else 64
    for c in configs:
        for key, size, cap in (("BLOCK_ROWS", rows, 256), ("BLOCK_COLS", cols, 256), ("BLOCK_RED", red, cap_red)):
            block = c[key]
            assert block >= 16 and block & (block - 1) == 0 and block <= max(16, triton_next_pow2(size)) and block <= cap
        if kernel != "backward_weight":
            assert c["SPLIT"] == 1
        splits, rows_per_split = kernel_module._split_plan(red, c["SPLIT"], c["BLOCK_RED"])
        if splits > 1:  # fp32 partials stay small and int32-addressable
            assert splits * (rows * cols + rows) * 4 <= kernel_module._SPLIT_MAX_BYTES
            assert rows_per_split >= kernel_module._SPLIT_MIN_STEPS * c["BLOCK_RED"]
    if (rows, cols, red) == (8192, 8192, 8192):  # two waves of 128x128 tiles: no small tiles
        assert all(c["BLOCK_ROWS"] * c["BLOCK_COLS"] >= 128 * 128 for c in configs)
    if kernel == "backward_weight" and red == 8192 and sms >= 108:
        # A small layer over a long batch: the GPU is filled by splitting the batch.
        assert heuristic["SPLIT"] > 1 and any(c["SPLIT"] > 1 for c in configs[1:])
    if kernel == "backward_weight" and red <= 64:
        assert all(c["SPLIT"] == 1 for c in configs)  # a short batch is never split


def triton_next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def test_autotune_picks_the_fastest_and_skips_failures():
    configs = [{"id": i} for i in range(4)]
    launched = []

    def launch(config):
        launched.append(config["id"])
        if config["id"] == 3:
            raise RuntimeError("out of shared memory")

    def timer(fn):
        fn()
        return {0: 2.0, 1: 0.5, 2: 1.0}[launched[-1]]

    assert kernel_module._autotune(configs, launch, timer=timer) == {"id": 1}
    assert launched == [0, 1, 2, 3]
    with pytest.raises(RuntimeError, match="none of 1 configs ran.*out of shared memory"):
        kernel_module._autotune([{"id": 3}], launch, timer=timer)


def test_autotune_key_buckets_the_batch(as_compiled, monkeypatch):
    # As on a GPU: the first call of a (shape, bucket) tunes, later calls in the bucket reuse it.
    as_compiled(132)
    monkeypatch.setattr(kernel_module, "_AUTOTUNE", True)
    monkeypatch.setattr(kernel_module, "_TUNED", {})
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    tuned = []

    def fake_autotune(configs, launch):
        tuned.append(len(configs))
        return configs[-1]

    monkeypatch.setattr(kernel_module, "_autotune", fake_autotune)

    class FakeCudaTensor:
        dtype = torch.float16
        device = torch.device("cuda", 0)

    select = kernel_module._select_config
    first = select("forward", 1000, 512, 512, "rows", False, FakeCudaTensor, None)
    assert select("forward", 600, 512, 512, "rows", False, FakeCudaTensor, None) == first  # same bucket 1024
    assert len(tuned) == 1
    select("forward", 1500, 512, 512, "rows", False, FakeCudaTensor, None)  # bucket 2048
    select("backward_weight", 512, 512, 700, "red", True, FakeCudaTensor, None)  # batch 700 -> 1024
    select("backward_weight", 512, 512, 1000, "red", True, FakeCudaTensor, None)
    assert len(tuned) == 3
    # Launch-bound sizes and tuning switched off take the heuristic config, untuned.
    small = select("forward", 8, 16, 16, "rows", False, FakeCudaTensor, None)
    assert small == kernel_module._heuristic_config("forward", 8, 16, 16, torch.float16, 132, False)
    monkeypatch.setattr(kernel_module, "_AUTOTUNE", False)
    select("forward", 9000, 512, 512, "rows", False, FakeCudaTensor, None)
    assert len(tuned) == 3
    assert kernel_module._bucket(1) == 16 and kernel_module._bucket(64) == 64 and kernel_module._bucket(65) == 128


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
    torch_result = run_layer(reference_layer, x, weight, b, feedback, grad_y, "relu")
    sms = kernel_module._sm_count(torch.device("cuda"))
    candidates = {
        "forward": kernel_module._candidate_configs("forward", M, out_features, in_features, dtype, sms),
        "backward_input": kernel_module._candidate_configs("backward_input", M, in_features, out_features, dtype, sms),
        "backward_weight": kernel_module._candidate_configs("backward_weight", out_features, in_features, M, dtype,
                                                            sms, True),
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
        assert_parity(result, torch_result, expected, dtype)


@pytest.mark.cuda
def test_cuda_autotuned_path(monkeypatch):
    monkeypatch.setattr(kernel_module, "_AUTOTUNE", True)
    monkeypatch.setattr(kernel_module, "_TUNED", {})
    check_against_oracle((2000,), 784, 128, torch.bfloat16, True, "relu", device="cuda")
    keys = set(kernel_module._TUNED)
    assert {k[0] for k in keys} == {"forward", "backward_input", "backward_weight"}
    check_against_oracle((1500,), 784, 128, torch.bfloat16, True, "relu", device="cuda")  # same 2048 bucket
    assert set(kernel_module._TUNED) == keys


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_split_k_long_batch(dtype):
    # The tutorial's last layer at batch 8192: one output tile, so the batch is split.
    first = _weight_grads_against_oracle(8192, 64, 10, dtype, True, "identity", "cuda", split_k=64)
    second = _weight_grads_against_oracle(8192, 64, 10, dtype, True, "identity", "cuda", split_k=64)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    _weight_grads_against_oracle(8192, 784, 128, dtype, True, "relu", "cuda")  # tuned or heuristic split
