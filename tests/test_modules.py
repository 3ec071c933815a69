"""FALinear (fa_triton/modules.py): behaves like nn.Linear, keeps its feedback fixed."""

import math

import pytest
import torch
from torch import nn

from fa_triton import FALinear
from tests.helpers import KERNEL_DEVICE

BACKEND_DEVICES = [("torch", "cpu"), ("triton", KERNEL_DEVICE)]


def test_weight_and_bias_initialised_as_nn_linear():
    torch.manual_seed(3)
    linear = nn.Linear(20, 7)
    torch.manual_seed(3)
    layer = FALinear(20, 7)
    assert torch.equal(layer.weight, linear.weight) and torch.equal(layer.bias, linear.bias)


def test_feedback_is_independent_and_from_weights_distribution():
    layer = FALinear(400, 300)
    bound = 1 / math.sqrt(400)
    assert layer.feedback.shape == layer.weight.shape
    assert layer.feedback.abs().max() <= bound
    # U(-a, a) has standard deviation a / sqrt(3); 120k samples pin it within ~1%.
    assert abs(layer.feedback.std().item() - bound / math.sqrt(3)) < 0.01 * bound
    cosine = torch.nn.functional.cosine_similarity(layer.feedback.flatten(), layer.weight.flatten(), dim=0)
    assert abs(cosine.item()) < 0.02


def test_feedback_is_a_buffer_not_a_parameter():
    layer = FALinear(5, 4)
    assert all(p is not layer.feedback for p in layer.parameters())
    assert [name for name, _ in layer.named_parameters()] == ["weight", "bias"]
    assert set(layer.state_dict()) == {"weight", "bias", "feedback"}


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_optimizer_step_leaves_feedback_unchanged(backend, device):
    layer = FALinear(6, 3, backend=backend, device=device)
    feedback, weight = layer.feedback.clone(), layer.weight.detach().clone()
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-2)
    layer(torch.randn(8, 6, device=device)).square().sum().backward()
    optimizer.step()
    assert torch.equal(layer.feedback, feedback)
    assert not torch.equal(layer.weight, weight)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_state_dict_round_trip_is_bitwise(backend, device):
    source = FALinear(9, 5, activation="tanh", backend=backend, device=device)
    target = FALinear(9, 5, activation="tanh", backend=backend, device=device)
    assert not torch.equal(source.feedback, target.feedback)
    target.load_state_dict(source.state_dict())
    x = torch.randn(3, 9, device=device, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y_source, y_target = source(x), target(x2)
    assert torch.equal(y_source, y_target)
    y_source.sum().backward()
    y_target.sum().backward()
    assert torch.equal(x.grad, x2.grad) and torch.equal(source.weight.grad, target.weight.grad)


def test_to_float64_casts_feedback_and_runs():
    layer = FALinear(4, 3).to(torch.float64)
    assert layer.weight.dtype == layer.bias.dtype == layer.feedback.dtype == torch.float64
    y = layer(torch.randn(2, 4, dtype=torch.float64))
    assert y.dtype == torch.float64
    with pytest.raises(TypeError, match="weight has dtype torch.float64 but x has dtype torch.float32"):
        layer(torch.randn(2, 4))


def test_to_half_moves_feedback_too():
    layer = FALinear(4, 3).to(torch.float16)
    assert layer.feedback.dtype == torch.float16


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_backward_is_deterministic(backend, device):
    layer = FALinear(33, 17, activation="gelu", backend=backend, device=device)
    x = torch.randn(5, 11, 33, device=device)
    grads = []
    for _ in range(2):
        layer.zero_grad()
        xr = x.clone().requires_grad_(True)
        layer(xr).pow(2).sum().backward()
        grads.append((xr.grad, layer.weight.grad.clone(), layer.bias.grad.clone()))
    for first, second in zip(*grads):
        assert torch.equal(first, second)


def test_from_linear_copies_weights_and_takes_feedback():
    linear = nn.Linear(6, 4)
    feedback = torch.randn(4, 6)
    layer = FALinear.from_linear(linear, activation="identity", feedback=feedback)
    assert torch.equal(layer.weight, linear.weight) and torch.equal(layer.bias, linear.bias)
    assert torch.equal(layer.feedback, feedback)
    assert layer.weight is not linear.weight  # a copy: training one leaves the other alone
    x = torch.randn(2, 6)
    torch.testing.assert_close(layer(x), linear(x))


def test_from_linear_without_bias_and_fresh_feedback():
    linear = nn.Linear(6, 4, bias=False, dtype=torch.float64)
    layer = FALinear.from_linear(linear)
    assert layer.bias is None and layer.weight.dtype == torch.float64
    assert not torch.equal(layer.feedback, linear.weight)


def test_from_linear_rejects_bad_arguments():
    with pytest.raises(TypeError, match="linear must be an nn.Linear, got Conv1d"):
        FALinear.from_linear(nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match=r"feedback must have the shape of linear.weight \(4, 6\).*\(6, 4\)"):
        FALinear.from_linear(nn.Linear(6, 4), feedback=torch.randn(6, 4))


def test_extra_repr_shows_sizes_activation_backend():
    text = repr(FALinear(784, 128, activation="leaky_relu", negative_slope=0.2, backend="torch", bias=False))
    assert text == ("FALinear(in_features=784, out_features=128, bias=False, "
                    "activation=leaky_relu(negative_slope=0.2), method=fa, backend=torch)")


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_sequential_training_step_reduces_loss(backend, device):
    torch.manual_seed(0)
    model = nn.Sequential(
        FALinear(20, 32, backend=backend, device=device),
        FALinear(32, 3, activation="identity", backend=backend, device=device),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.randn(64, 20, device=device)
    target = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    losses = []
    for _ in range(20):
        loss = nn.functional.cross_entropy(model(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_any_leading_shape():
    layer = FALinear(5, 2)
    assert layer(torch.randn(5)).shape == (2,)
    assert layer(torch.randn(2, 3, 4, 5)).shape == (2, 3, 4, 2)


# ------------------------------------------------------------- forward's fast path (``_fit``)
# A call like the last checked one skips the argument checks; these show that nothing a user can
# change between calls slips past them.

def _fitted(**kwargs) -> FALinear:
    layer = FALinear(4, 3, backend="torch", **kwargs)
    layer(torch.randn(2, 4))  # records the fit
    assert layer._fit is not None
    return layer


def test_fast_path_is_taken_and_gives_the_checked_result(monkeypatch):
    import fa_triton.layers.linear as linear_module

    layer = _fitted()
    x = torch.randn(5, 4, requires_grad=True)
    expected = layer._checked_forward(x)
    calls = []
    monkeypatch.setattr(linear_module, "check_inputs", lambda *args, **kwargs: calls.append(args))
    y = layer(x)
    assert calls == [] and torch.equal(y, expected)
    y.sum().backward()
    assert x.grad is not None and layer.weight.grad is not None


@pytest.mark.parametrize("bad_x, error, message", [
    (torch.randn(2, 5), ValueError, r"x must have shape \[..., in_features=4\]"),
    (torch.randn(2, 4, dtype=torch.float64), TypeError, "weight has dtype torch.float32 but x has dtype torch.float64"),
    (torch.zeros(2, 4, dtype=torch.int64), TypeError, "x must be a floating-point tensor"),
    (torch.tensor(1.0), ValueError, "x must have shape"),
    ([[1.0] * 4], TypeError, "x must be a torch.Tensor"),
])
def test_bad_input_after_a_good_call_is_still_named(bad_x, error, message):
    layer = _fitted()
    with pytest.raises(error, match=message):
        layer(bad_x)
    layer(torch.randn(3, 4))  # and the layer still works


def test_replaced_parameters_and_feedback_are_checked_again():
    layer = _fitted()
    layer.weight = nn.Parameter(torch.randn(3, 5))
    with pytest.raises(ValueError, match="feedback must have the shape of weight"):
        layer(torch.randn(2, 5))
    layer = _fitted()
    layer.bias = nn.Parameter(torch.randn(2))
    with pytest.raises(ValueError, match=r"bias must have shape \(3,\)"):
        layer(torch.randn(2, 4))
    layer = _fitted()
    layer.feedback = torch.randn(3, 5)
    with pytest.raises(ValueError, match="feedback must have the shape of weight"):
        layer(torch.randn(2, 4))


def test_moves_and_casts_reset_the_fit():
    layer = _fitted()
    layer.to(torch.float64)  # changes the tensors in place: the same objects
    assert layer._fit is None
    y = layer(torch.randn(2, 4, dtype=torch.float64))
    assert y.dtype == torch.float64
    with pytest.raises(TypeError, match="weight has dtype torch.float64 but x has dtype torch.float32"):
        layer(torch.randn(2, 4))


def test_backend_change_resets_the_fit():
    layer = _fitted()
    layer.backend = "auto"
    assert layer._fit is None
    layer(torch.randn(2, 4))
    assert layer._fit is not None


def test_parametrized_weight_is_applied_at_every_call():
    from torch.nn.utils import parametrize

    class Double(nn.Module):
        def forward(self, weight):
            return 2 * weight

    layer = _fitted(activation="identity")
    parametrize.register_parametrization(layer, "weight", Double())
    x = torch.randn(2, 4)
    for _ in range(2):
        expected = x @ (2 * layer.parametrizations.weight.original).t() + layer.bias
        torch.testing.assert_close(layer(x), expected)
    with torch.no_grad():
        layer.parametrizations.weight.original.mul_(3)
    torch.testing.assert_close(layer(x), x @ (2 * layer.parametrizations.weight.original).t() + layer.bias)


def test_autocast_after_eager_calls_still_casts():
    layer = _fitted()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(torch.randn(2, 4))
    assert y.dtype == torch.bfloat16


def test_a_copy_or_a_pickled_layer_runs_on_its_own_tensors(tmp_path):
    import copy

    layer = _fitted()
    for clone in (copy.deepcopy(layer), _reloaded(layer, tmp_path)):
        with torch.no_grad():
            clone.weight.mul_(2)
        x = torch.randn(2, 4)
        torch.testing.assert_close(clone(x), torch.relu(x @ clone.weight.t() + clone.bias))
        assert not torch.allclose(clone(x), layer(x))


def test_a_copy_or_a_pickled_triton_layer_runs_on_its_own_tensors(tmp_path):
    # The fit holds the Triton steps' launch plans (functions, the plans' generation): a copy or a
    # pickle leaves it behind and records its own.
    import copy

    layer = FALinear(4, 3, backend="triton")
    x = torch.randn(2, 4)
    for _ in range(3):
        layer(x)
    assert layer._fit is not None
    for clone in (copy.deepcopy(layer), _reloaded(layer, tmp_path)):
        assert clone._fit is None
        with torch.no_grad():
            clone.weight.mul_(2)
        for _ in range(3):
            torch.testing.assert_close(clone(x), torch.relu(x @ clone.weight.t() + clone.bias))
        assert clone._fit is not None and not torch.allclose(clone(x), layer(x))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_an_activation_changed_after_a_fitted_call_is_the_one_that_runs(backend):
    # The fit binds the activation and its slope: setting either records a new one.
    layer = FALinear(4, 3, backend=backend)
    x = torch.randn(5, 4)
    expected = {"tanh": torch.tanh, "relu": torch.relu, "identity": lambda z: z}
    for activation, slope in (("tanh", 0.01), ("leaky_relu", 0.2), ("leaky_relu", -0.3), ("identity", 0.2),
                              ("relu", 0.2)):
        layer(x)
        layer.activation, layer.negative_slope = activation, slope
        assert layer._fit is None
        z = x @ layer.weight.detach().t() + layer.bias.detach()
        want = torch.nn.functional.leaky_relu(z, slope) if activation == "leaky_relu" else expected[activation](z)
        for _ in range(3):  # checked, then the fast path
            torch.testing.assert_close(layer(x).detach(), want)


def _reloaded(layer, tmp_path):
    torch.save(layer, tmp_path / "layer.pt")
    return torch.load(tmp_path / "layer.pt", weights_only=False)


def test_changes_the_fit_cannot_see_by_identity_are_checked_again():
    # assign=True through swap_tensors keeps the objects but changes their dtype;
    # so does assigning .data; a layer pickled before the fit existed has none.
    layer = _fitted()
    state = {name: t.double() for name, t in layer.state_dict().items()}
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        layer.load_state_dict(state, assign=True)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
    with pytest.raises(TypeError, match="weight has dtype torch.float64 but x has dtype torch.float32"):
        layer(torch.randn(2, 4))
    layer = _fitted()
    layer.weight.data = layer.weight.data.double()
    with pytest.raises(TypeError, match="weight has dtype torch.float64 but x has dtype torch.float32"):
        layer(torch.randn(2, 4))
    layer = _fitted()
    layer.weight.data = torch.randn(3, 5)
    with pytest.raises(ValueError, match=r"x must have shape \[..., in_features=5\]"):
        layer(torch.randn(2, 4))
    layer = _fitted()
    del layer.__dict__["_fit"]
    assert layer(torch.randn(2, 4)).shape == (2, 3) and layer._fit is not None


def test_a_rule_changed_after_a_fitted_call_is_the_one_that_runs():
    # backward_as_backprop swaps the rule with the tensors kept: the fast path must follow it.
    layer = _fitted(activation="identity")
    x = torch.randn(5, 4, requires_grad=True)
    layer(x).sum().backward()
    fa_grad = x.grad.clone()
    torch.testing.assert_close(fa_grad, torch.ones(5, 3) @ layer.feedback)
    x.grad = None
    with layer.backward_as_backprop():
        layer(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(5, 3) @ layer.weight.detach())
    x.grad = None
    layer(x).sum().backward()  # and back to FA
    torch.testing.assert_close(x.grad, fa_grad)


def test_a_brsf_seed_changed_after_a_fitted_call_is_the_one_that_runs(tmp_path):
    # Every writer of the seed clears the cached rule, which the fast path compares; a pickle
    # holding a rule of an older seed (written before that) forms it anew when loaded.
    from fa_triton.testing import oracle_feedback

    layer = FALinear(4, 3, activation="identity", method="brsf", backend="torch", dtype=torch.float64)
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)

    def grad_x_and_expected(module):
        x.grad = None
        module(x).sum().backward()
        feedback = oracle_feedback("brsf", module.weight.detach(), seed=int(module.feedback_seed),
                                   counter=int(module.counter))
        return x.grad, torch.ones(5, 3, dtype=torch.float64) @ feedback

    grad_x_and_expected(layer)  # records the fit
    for change in (lambda: layer.reset_feedback(torch.Generator().manual_seed(7)),
                   lambda: layer.load_state_dict({**layer.state_dict(), "feedback_seed": torch.tensor([12345])}),
                   lambda: layer.share_feedback_state(FALinear(4, 3, method="brsf", dtype=torch.float64))):
        seed = layer._seed
        change()
        assert layer._seed != seed
        torch.testing.assert_close(*grad_x_and_expected(layer), rtol=1e-12, atol=1e-12)
    stale = layer.rule
    layer.reset_feedback(torch.Generator().manual_seed(8))
    layer._rule = stale  # what an older pickle could hold
    torch.save(layer, tmp_path / "layer.pt")
    clone = torch.load(tmp_path / "layer.pt", weights_only=False)
    assert clone.rule.seed == clone._seed == int(clone.feedback_seed)
    torch.testing.assert_close(*grad_x_and_expected(clone), rtol=1e-12, atol=1e-12)
