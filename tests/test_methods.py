"""The feedback-alignment family (fa_triton/methods.py, FALinear(method=...)): every rule against
the float64 oracle in both backends (B built from the rule's equations by fa_triton.testing, never
by the code under test; fixed bounds; B read back through the backward and checked against the
rule), backprop against nn.Linear, brsf's draws, kp's gradient, wm's mirror, init options,
checkpoints, errors, and a short training run per method."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fa_triton
import fa_triton.metrics
from fa_triton import METHODS, FALinear, fa_linear
from fa_triton.rules.methods import FeedbackRule, feedback_matrix
from fa_triton.rules.philox import philox_uniform
from fa_triton.testing import rule_scale
from tests.helpers import KERNEL_DEVICE, teacher_task, train_on
from tests.oracle import (
    assert_backends_parity,
    assert_feedback_rule,
    assert_parity,
    assert_uses_feedback,
    feedback_from_backward,
    layer_bounds,
    layer_feedback,
    local_error,
    oracle,
)

ALL_METHODS = list(METHODS)


def _layer_and_inputs(method, backend, dtype, device, activation="tanh", init="kaiming", bias=True, seed=0):
    torch.manual_seed(seed)
    layer = FALinear(21, 13, bias=bias, activation=activation, method=method, init=init, backend=backend,
                     device=device, dtype=dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(17, 21, generator=gen, dtype=torch.float64).to(dtype).to(device)
    grad_y = torch.randn(17, 13, generator=gen, dtype=torch.float64).to(dtype).to(device)
    return layer, x, grad_y


def _run(layer, x, grad_y):
    """y and the gradients of x, W, b (and B for kp) after one forward and backward."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y = layer(x)
    y.backward(grad_y)
    return {"y": y.detach(), "grad_x": x.grad, "grad_weight": layer.weight.grad,
            "grad_bias": layer.bias.grad if layer.bias is not None else None,
            "grad_feedback": layer.feedback.grad if isinstance(layer.feedback, nn.Parameter) else None}


def _expected(layer, x, grad_y):
    """B from the layer's method's equations (``fa_triton.testing.layer_feedback``: its stored
    state, the scale by formula, brsf's draw from Philox; after the forward: the draw it made),
    and the float64 oracle of the layer's equations with that B."""
    B = layer_feedback(layer)
    bias = layer.bias.detach() if layer.bias is not None else None
    return B, oracle(x, layer.weight.detach(), bias, B, grad_y, layer.activation)


@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.parametrize("backend, dtype", [("torch", torch.float64), ("torch", torch.float32),
                                            ("triton", torch.float32), ("triton", torch.float16)])
def test_every_method_against_the_oracle(method, backend, dtype):
    device = KERNEL_DEVICE if backend == "triton" else "cpu"
    layer, x, grad_y = _layer_and_inputs(method, backend, dtype, device)
    result = _run(layer, x, grad_y)
    B, expected = _expected(layer, x, grad_y)  # brsf: B of the draw this forward made
    bounds = None if dtype == torch.float64 else layer_bounds(x, layer.weight, layer.bias, B, grad_y, "tanh",
                                                              dtype=dtype, method=method)
    reference_layer = FALinear(21, 13, activation="tanh", method=method, backend="torch", device=device, dtype=dtype)
    reference_layer.load_state_dict(layer.state_dict())
    if method == "brsf":
        reference_layer.counter.sub_(1)  # its forward advances to the same draw
    torch_result = _run(reference_layer, x, grad_y)
    # The reference is held to the oracle first, then this backend: fixed bounds, so a bug they
    # share fails both (the torch cases check the reference itself).
    assert_backends_parity(result, torch_result, expected, dtype, bounds, name=f"{backend} backend")
    # B as the backward really applies it, read back through it: the rule's magnitudes and signs.
    assert_feedback_rule(feedback_from_backward(layer), method, layer.weight, feedback=layer.feedback)
    if dtype == torch.float64 and method != "backprop":
        # FA sends δ through B, not W: a layer that passed W as B (backprop) fails here by name.
        delta = local_error(x, layer.weight, layer.bias, grad_y, "tanh")[1]
        assert_uses_feedback(result["grad_x"], delta, B, layer.weight)
    if method == "kp":  # Kolen–Pollack: B's gradient is W's
        assert torch.equal(result["grad_feedback"], result["grad_weight"])
    else:
        assert result["grad_feedback"] is None


def test_backprop_equals_nn_linear_in_float64():
    layer, x, grad_y = _layer_and_inputs("backprop", "torch", torch.float64, "cpu")
    linear = nn.Linear(21, 13, dtype=torch.float64)
    linear.load_state_dict({"weight": layer.weight.detach(), "bias": layer.bias.detach()})
    result = _run(layer, x, grad_y)
    x_leaf = x.clone().requires_grad_(True)
    torch.tanh(linear(x_leaf)).backward(grad_y)
    for name, got, want in (("y", result["y"], torch.tanh(linear(x)).detach()),
                            ("grad_x", result["grad_x"], x_leaf.grad),
                            ("grad_weight", result["grad_weight"], linear.weight.grad),
                            ("grad_bias", result["grad_bias"], linear.bias.grad)):
        relative = ((got - want).norm() / want.norm()).item()
        assert relative <= 1e-12, f"{name}: relative error {relative:.3g}"


@pytest.mark.parametrize("method", ["usf", "frsf", "brsf"])
def test_sign_methods_feed_back_through_the_sign_of_w(method):
    layer, x, grad_y = _layer_and_inputs(method, "torch", torch.float64, "cpu")
    result = _run(layer, x, grad_y)
    # B as the backward applies it: concordant with W, |B| = s (usf), |R| (frsf), <= b (brsf).
    assert_feedback_rule(feedback_from_backward(layer), method, layer.weight, feedback=layer.feedback)
    if method == "usf":  # B = s·sign(W): grad_x = s · δ sign(W), with s the init's std, by formula
        delta = grad_y * (1 - result["y"] ** 2)
        s = rule_scale("usf", "kaiming", 21, 13)
        assert s == pytest.approx(1 / math.sqrt(3 * 21))
        assert_parity(result["grad_x"], s * delta @ torch.sign(layer.weight.detach()), torch.float64, name="grad_x")
    assert layer.state_dict().get("feedback") is None or method == "frsf"  # usf and brsf store no B


def test_brsf_redraws_at_every_training_forward_and_only_then():
    layer, x, grad_y = _layer_and_inputs("brsf", "torch", torch.float32, "cpu")
    draws = []
    for _ in range(3):
        _run(layer, x, grad_y)
        draws.append(layer.feedback_matrix().clone())
    assert int(layer.counter) == 3
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])
    with torch.no_grad():
        layer(x)
    layer.eval()
    layer(x)
    assert int(layer.counter) == 3  # inference and eval mode use the last draw
    # The same seed and counter give the same R: reproducible, e.g. on every DDP rank.
    twin = FALinear(21, 13, activation="tanh", method="brsf", backend="torch")
    twin.load_state_dict(layer.state_dict())
    assert twin.rule.seed == layer.rule.seed and torch.equal(twin.feedback_matrix(), draws[2])


def test_philox_takes_any_integer_offsets():
    # int32 offsets (near 2³¹, where a 32-bit product or shift would wrap) draw what int64 ones do.
    offsets = torch.arange(2**31 - 40, 2**31 - 1, dtype=torch.int64)
    assert torch.equal(philox_uniform(11, offsets.to(torch.int32)), philox_uniform(11, offsets))


def test_philox_matches_tritons_generator(kernel_device):
    # fa_triton.rules.philox.philox_uniform is bitwise tl.rand (the kernels' R, materialized in PyTorch).
    import triton
    import triton.language as tl

    @triton.jit
    def draw(out_ptr, seed, counter_ptr, numel, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        u = tl.rand(seed, tl.load(counter_ptr) * numel + offs.to(tl.int64))
        tl.store(out_ptr + offs, u, mask=offs < numel)

    # The last pair puts offsets above 2³² (a non-zero high counter word).
    for seed, counter in ((0, 0), (12345, 7), (2**40 + 17, 3_000_000), (2**62 + 3, 1), (99, 2**25 + 5)):
        out = torch.empty(300, device=kernel_device)
        counter_t = torch.tensor([counter], dtype=torch.int64, device=kernel_device)
        draw[(triton.cdiv(300, 128),)](out, seed, counter_t, 300, BLOCK=128)
        offsets = counter * 300 + torch.arange(300, dtype=torch.int64, device=kernel_device)
        assert torch.equal(out, philox_uniform(seed, offsets)), (seed, counter)


def test_kp_gradients_accumulate_separately():
    # W and B receive the same gradient but as separate tensors: accumulating twice doubles each once.
    layer, x, grad_y = _layer_and_inputs("kp", "torch", torch.float64, "cpu")
    layer(x).backward(grad_y)
    layer(x).backward(grad_y)
    assert torch.equal(layer.feedback.grad, layer.weight.grad)
    once = _run(layer, x, grad_y)["grad_weight"]
    torch.testing.assert_close(layer.feedback.grad, once)
    assert {id(p) for p in layer.parameters()} >= {id(layer.weight), id(layer.feedback)}  # in the optimizer's reach


@pytest.mark.parametrize("model, backend", [("linear", "torch"), ("linear", "triton"), ("chain", "torch"),
                                            ("chain", "triton"), ("fused chain", "triton"), ("conv", "torch")])
def test_kp_gradients_have_storages_of_their_own(model, backend, kernel_device, launches, fp32_matmul_precision):
    # Parameters viewing flat leaves (as over one flat buffer): each gradient reaches its leaf
    # through a view with the leaf's layout, which autograd keeps as the .grad without a copy.
    # B's gradient (W's) must still be a tensor of its own: two passes double each once. The
    # fused chain: tf32 allowed, the narrow MLP's fused backward (else the chain runs stepwise).
    from torch.func import functional_call

    fp32_matmul_precision(model == "fused chain")
    torch.manual_seed(0)
    device = kernel_device if backend == "triton" else "cpu"
    if model == "linear":
        module, x = FALinear(7, 5, method="kp", backend=backend), torch.randn(4, 7)
    elif model.endswith("chain"):
        module = fa_triton.models.mlp((7, 6, 5), ("relu", "tanh"), method="kp", backend=backend)
        x = torch.randn(4, 7)
    else:
        module, x = fa_triton.FAConv2d(2, 3, 3, method="kp", activation="relu"), torch.randn(2, 2, 5, 5)
    module, x = module.to(device), x.to(device)
    leaves = {name: p.detach().reshape(-1).clone().requires_grad_() for name, p in module.named_parameters()}
    views = {name: leaf.view(p.shape) for (name, p), leaf in zip(module.named_parameters(), leaves.values())}
    functional_call(module, views, (x,)).square().sum().backward()
    once = {name: leaf.grad.clone() for name, leaf in leaves.items()}
    functional_call(module, views, (x,)).square().sum().backward()
    pairs = [(name, name.replace("weight", "feedback")) for name in leaves if name.endswith("weight")]
    assert pairs and all(feedback in leaves for _, feedback in pairs)
    for weight, feedback in pairs:
        assert leaves[weight].grad.untyped_storage().data_ptr() != leaves[feedback].grad.untyped_storage().data_ptr()
    for name, leaf in leaves.items():
        torch.testing.assert_close(leaf.grad, 2 * once[name], rtol=1e-6, atol=1e-7, msg=lambda text, name=name: name)
    assert ("mlp_backward_kernel" in {name for name, _ in launches}) == (model == "fused chain"), launches


def test_wm_mirror_moves_b_towards_w():
    torch.manual_seed(3)
    layer = FALinear(40, 20, activation="identity", method="wm", bias=False)
    before = fa_triton.metrics.weight_alignment(layer).angle
    gen = torch.Generator().manual_seed(0)
    for _ in range(1000):
        layer.mirror(generator=gen)
    assert fa_triton.metrics.weight_alignment(layer).angle < before - 30
    with pytest.raises(ValueError, match="method='wm'"):
        FALinear(4, 3).mirror()


@pytest.mark.parametrize("init", ["kaiming", "xavier"])
def test_init_options(init):
    torch.manual_seed(0)
    layer = FALinear(300, 100, method="usf", init=init)
    bound = math.sqrt(6 / 400) if init == "xavier" else 1 / math.sqrt(300)
    assert layer.weight.abs().max() <= bound and layer.weight.abs().max() > 0.9 * bound
    assert torch.equal(layer.bias, torch.zeros(100)) == (init == "xavier")
    expected_scale = math.sqrt(2 / 400) if init == "xavier" else 1 / math.sqrt(900)
    assert layer.rule == FeedbackRule("usf", pytest.approx(expected_scale))
    fa = FALinear(300, 100, init=init)
    assert fa.feedback.abs().max() <= bound and ("init=xavier" in repr(fa)) == (init == "xavier")
    torch.manual_seed(0)
    assert torch.equal(FALinear(300, 100).weight, (torch.manual_seed(0), nn.Linear(300, 100))[1].weight)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_state_dict_round_trip_and_repr(method):
    layer, x, grad_y = _layer_and_inputs(method, "torch", torch.float32, "cpu")
    _run(layer, x, grad_y)
    copy = FALinear(21, 13, activation="tanh", method=method)
    copy.load_state_dict(layer.state_dict())
    assert f"method={method}" in repr(layer)
    torch.testing.assert_close(copy.feedback_matrix(), layer.feedback_matrix(), rtol=0, atol=0)
    keys = set(layer.state_dict())
    assert keys == {"weight", "bias"} | {"fa": {"feedback"}, "frsf": {"feedback"}, "kp": {"feedback"},
                                         "wm": {"feedback"}, "brsf": {"feedback_seed", "counter"}}.get(method, set())


@pytest.mark.parametrize("method", ["kp", "wm", "frsf", "usf", "backprop"])
def test_an_fa_checkpoint_loads_into_other_methods(method):
    fa = FALinear(21, 13)
    other = FALinear(21, 13, method=method)
    strict = other.feedback is not None  # usf and backprop have no feedback to load
    result = other.load_state_dict(fa.state_dict(), strict=strict)
    assert torch.equal(other.weight, fa.weight)
    if strict:
        assert torch.equal(other.feedback, fa.feedback)
    else:
        assert result.unexpected_keys == ["feedback"]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"method": "dfa"}, ValueError, "method must be one of"),
        ({"method": "usf", "init": "normal"}, ValueError, "init must be one of"),
    ],
)
def test_bad_method_arguments_of_the_module(kwargs, error, match):
    with pytest.raises(error, match=match):
        FALinear(4, 3, **kwargs)


def test_method_and_option_mismatches_of_the_functional_form():
    x, w, b = torch.randn(2, 4), torch.randn(3, 4), torch.randn(3)
    B, counter = torch.randn(3, 4), torch.zeros(1, dtype=torch.int64)
    with pytest.raises(ValueError, match="method='usf' forms B from sign"):
        fa_linear(x, w, b, B, method="usf", feedback_scale=0.1)
    with pytest.raises(ValueError, match="method='usf' needs feedback_scale"):
        fa_linear(x, w, b, None, method="usf")
    with pytest.raises(ValueError, match="method='fa' takes no|method='kp' takes no seed"):
        fa_linear(x, w, b, B, method="kp", seed=3)
    with pytest.raises(ValueError, match="counter must be an int64 tensor"):
        fa_linear(x, w, b, None, method="brsf", feedback_scale=0.5, seed=1, counter=torch.zeros(1))
    with pytest.raises(ValueError, match="method='backprop' forms B from weight itself"):
        fa_linear(x, w, b, B, method="backprop")
    with pytest.raises(TypeError, match="feedback must be a torch.Tensor"):
        fa_linear(x, w, b, None, method="frsf")
    y = fa_linear(x, w, b, None, method="brsf", feedback_scale=0.5, seed=1, counter=counter)
    assert y.shape == (2, 3)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_a_short_training_run_learns(method):
    # A teacher network's labels: every method's loss must fall within 60 Adam steps.
    torch.manual_seed(0)
    x, target = teacher_task()
    model = nn.Sequential(FALinear(20, 64, activation="relu", method=method),
                          FALinear(64, 64, activation="relu", method=method),
                          FALinear(64, 4, activation="identity", method=method))

    def mirror(model):
        for layer in model:
            layer.mirror()

    losses = train_on(model, x, target, 60, after_step=mirror if method == "wm" else None)
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10


def test_kp_aligns_faster_than_fa():
    # With weight decay in W's group, Kolen–Pollack drives W and B together; FA only aligns W to B.
    angles = {}
    for method in ("fa", "kp"):
        torch.manual_seed(0)
        model = nn.Sequential(FALinear(20, 64, activation="relu", method=method),
                              FALinear(64, 4, activation="identity", method=method))
        start = fa_triton.metrics.weight_alignment(model[1]).angle
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, weight_decay=1e-2)
        x, target = torch.randn(256, 20), torch.randint(0, 4, (256,))
        for _ in range(150):
            loss = F.cross_entropy(model(x), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        angles[method] = (start, fa_triton.metrics.weight_alignment(model[1]).angle)
    assert angles["fa"][1] < angles["fa"][0] and angles["kp"][1] < angles["kp"][0]  # both fall
    assert angles["kp"][1] < angles["fa"][1]


def test_metrics_for_every_method():
    torch.manual_seed(0)
    for method in ALL_METHODS:
        layer = FALinear(30, 10, method=method)
        angle, ratio = fa_triton.metrics.weight_alignment(layer)
        if method == "backprop":
            assert angle == pytest.approx(0, abs=1e-5) and ratio == pytest.approx(1)
        elif method == "usf":  # the angle between W and sign(W)
            assert angle == pytest.approx(fa_triton.metrics.angle_between(layer.weight, torch.sign(layer.weight)))
        elif method in ("frsf", "brsf"):  # B has W's signs: aligned from the start
            assert angle < 60 and ratio > 0
        else:  # an independent random B: near 90°
            assert 60 < angle < 120 and ratio > 0
    model = nn.Sequential(FALinear(8, 6, method="usf"), FALinear(6, 3, method="brsf", activation="identity"))
    angles = fa_triton.metrics.gradient_alignment(model, torch.randn(16, 8), torch.randint(0, 3, (16,)),
                                                  F.cross_entropy)
    assert len(angles) == 2 and angles[1] == pytest.approx(0, abs=1e-4)
    assert int(model[1].counter) == 0  # gradient_alignment leaves brsf's draw counter as it was


def test_convert_with_a_method():
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    for method in ALL_METHODS:
        converted = fa_triton.convert(model, method=method, init="xavier")
        layers = [m for m in converted.modules() if isinstance(m, FALinear)]
        assert [layer.method for layer in layers] == [method, method]
        assert converted[0].weight is not model[0].weight and torch.equal(converted[0].weight, model[0].weight)
        y = converted(torch.randn(4, 8))
        y.sum().backward()
        assert converted[0].weight.grad is not None
    double = fa_triton.convert(model.double(), method="brsf")
    assert double[0].weight.dtype == torch.float64 and double(torch.randn(2, 8, dtype=torch.float64)).dtype == \
        torch.float64
    with pytest.raises(ValueError, match="method must be one of"):
        fa_triton.convert(model, method="bp")


def test_compile_fullgraph_with_methods():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(FALinear(12, 10, method="usf", activation="tanh"),
                          FALinear(10, 8, method="brsf", activation="relu"),
                          FALinear(8, 3, method="kp", activation="identity"))
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(5, 12)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model(x).sum().backward()
    eager = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.load_state_dict(state)
    compiled(x).sum().backward()
    for a, b in zip(eager, [p.grad for p in model.parameters()]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert int(model[1].counter) == 1  # the compiled forward advanced brsf's draw as eager does


def test_autocast_with_a_sign_method():
    layer = FALinear(8, 4, method="usf", backend="torch")
    x = torch.randn(3, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.weight.grad.dtype == torch.float32 and x.grad is not None


def test_feedback_matrix_rounds_once_as_the_kernels_do():
    w = torch.randn(5, 7, dtype=torch.bfloat16)
    B = feedback_matrix(FeedbackRule("usf", 0.3), w, None, None)
    assert B.dtype == torch.bfloat16 and torch.equal(B.abs().unique(), torch.tensor([0.3], dtype=torch.bfloat16))
