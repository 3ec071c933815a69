"""fa_triton.convert (nn.Linear -> FALinear, nn.Conv2d -> FAConv2d, activation fusion,
include/exclude) and fa_triton.load_linear_state_dict (checkpoints of the original model)."""

import io
import warnings

import pytest
import torch
from torch import nn

from fa_triton import FAConv2d, FALinear, convert, load_linear_state_dict
from fa_triton.convert import Fused


class SmallCNN(nn.Module):
    """A CNN feature extractor with an MLP head: the conv and the head's Linear layers change."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
        self.head = nn.Sequential(
            nn.Linear(100, 32), nn.ReLU(),
            nn.Linear(32, 16), nn.LeakyReLU(0.2),
            nn.Linear(16, 16), nn.GELU(approximate="tanh"),  # not the erf gelu: not fused
            nn.Linear(16, 10),
        )

    def forward(self, x):
        return self.head(self.features(x))


def small_cnn():
    torch.manual_seed(0)
    return SmallCNN()


def batch(n=32, seed=0):
    """Images [n, 1, 12, 12] and a learnable target: the signs of two quadrants' means."""
    x = torch.randn(n, 1, 12, 12, generator=torch.Generator().manual_seed(seed))
    target = 5 * (x[:, 0, :6, :6].mean((1, 2)) > 0).long() + (x[:, 0, 6:, 6:].mean((1, 2)) > 0).long()
    return x, target


def test_convert_small_cnn_replaces_linear_and_conv_layers():
    model = small_cnn()
    original_keys = list(model.state_dict())
    converted, summary = convert(model, return_summary=True)

    assert converted is not model and all(type(m) is nn.Linear for m in model.head[::2])  # model untouched
    assert [type(m) for m in converted.features] == [FAConv2d, Fused, nn.MaxPool2d, nn.Flatten]
    assert converted.features[0].activation == "relu"  # Conv2d + ReLU fused too
    head = converted.head
    assert [type(m) for m in head] == [FALinear, Fused, FALinear, Fused, FALinear, nn.GELU, FALinear]
    assert [(m.activation, m.negative_slope) for m in head[::2]] == [
        ("relu", 0.01), ("leaky_relu", 0.2), ("identity", 0.01), ("identity", 0.01)
    ]
    for old, new in zip(model.head[::2], head[::2]):
        assert torch.equal(new.weight, old.weight) and torch.equal(new.bias, old.bias)
        assert new.weight.device == old.weight.device and new.weight.dtype == old.weight.dtype
        assert not torch.equal(new.feedback, new.weight)
    assert torch.equal(converted.features[0].weight, model.features[0].weight)

    # Indices are kept, so the state_dict keys are the original ones plus the feedback buffers.
    assert list(k for k in converted.state_dict() if not k.endswith("feedback")) == original_keys
    assert sorted(k for k in converted.state_dict() if k.endswith("feedback")) == ["features.0.feedback"] + [
        f"head.{i}.feedback" for i in (0, 2, 4, 6)
    ]
    assert summary.names == ["features.0", "head.0", "head.2", "head.4", "head.6"]
    assert [(c.activation, c.fused, c.kind) for c in summary.converted] == [
        ("relu", "features.1", "FAConv2d"), ("relu", "head.1", "FALinear"), ("leaky_relu", "head.3", "FALinear"),
        ("identity", None, "FALinear"), ("identity", None, "FALinear")
    ]
    # FA changes the backward pass only: the forward is the original model's.
    x, _ = batch()
    assert torch.equal(converted(x), model(x))


def test_converted_cnn_trains():
    model = convert(small_cnn())
    feedback = [m.feedback.clone() for m in model.modules() if isinstance(m, FALinear)]
    conv_weight = model.features[0].weight.detach().clone()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, target = batch(64)
    losses = []
    for _ in range(25):
        loss = nn.functional.cross_entropy(model(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert max(losses[-5:]) < 0.8 * losses[0], losses
    # The conv layers learn through the feedback matrices, which never change.
    assert not torch.equal(model.features[0].weight, conv_weight)
    assert all(torch.equal(f, m.feedback) for f, m in zip(feedback, (m for m in model.modules()
                                                                    if isinstance(m, FALinear))))


def test_convert_options():
    model = small_cnn()
    # Keep the output layer trained by backprop; the summary lists it.
    converted, summary = convert(model, exclude=["head.6"], return_summary=True)
    assert type(converted.head[6]) is nn.Linear and summary.kept == [("head.6", "not selected by include/exclude")]
    # A type matches the layer or any module containing it; patterns are fnmatch-style.
    with pytest.warns(UserWarning, match="5 kept"):
        assert convert(model, exclude=[nn.Sequential], return_summary=True)[1].names == []
    assert convert(model, include=["head.[02]"], return_summary=True)[1].names == ["head.0", "head.2"]
    # An excluded activation is not fused.
    converted = convert(model, exclude="head.1")
    assert converted.head[0].activation == "identity" and type(converted.head[1]) is nn.ReLU
    # No fusion on request; the backend is passed on; inplace converts the model itself.
    converted = convert(model, activation_fusion=False, backend="torch")
    assert [type(m) for m in converted.head[:2]] == [FALinear, nn.ReLU]
    assert {m.backend for m in converted.modules() if isinstance(m, FALinear)} == {"torch"}
    assert convert(model, inplace=True) is model and isinstance(model.head[0], FALinear)


def test_convert_prints_summary(capsys):
    convert(small_cnn(), verbose=True)
    printed = capsys.readouterr().out
    assert "4 nn.Linear -> FALinear" in printed and "head.0: FALinear, activation=relu (fused head.1" in printed


def test_convert_shared_modules_and_special_cases():
    torch.manual_seed(0)
    tied = nn.Linear(6, 6)
    act = nn.Tanh()
    attention = nn.MultiheadAttention(6, 2)
    model = nn.Sequential(tied, act, tied, act, nn.Linear(6, 6, bias=False), nn.Sigmoid(), attention)
    model[4].weight.requires_grad_(False)
    model.eval()
    converted, summary = convert(model, return_summary=True)
    # The same Linear in two slots stays one layer: one weight, one feedback.
    assert converted[0] is converted[2] and converted[0].activation == "tanh"
    assert [type(m) for m in converted[:6]] == [FALinear, Fused] * 3
    assert converted[4].bias is None and not converted[4].weight.requires_grad and not converted[4].training
    assert type(converted[6].out_proj) is not FALinear
    assert summary.kept[0][0] == "6.out_proj" and "MultiheadAttention" in summary.kept[0][1]
    # An nn.Linear itself converts to an FALinear.
    layer = nn.Linear(3, 2)
    assert isinstance(convert(layer), FALinear) and torch.equal(convert(layer).weight, layer.weight)


def test_convert_model_without_linear_returns_it_unchanged():
    model = nn.Sequential(nn.Conv1d(1, 2, 3), nn.ReLU())
    with pytest.warns(UserWarning, match="no nn.Linear layer to convert \\(nor nn.Conv2d\\).*returned unchanged"):
        result, summary = convert(model, return_summary=True)
    assert result is model and summary.converted == []


def test_convert_bad_arguments():
    model = small_cnn()
    with pytest.raises(ValueError, match=r"\['head\.9'\] match no module"):
        convert(model, exclude=["head.9"])
    with pytest.raises(TypeError, match="include entries must be module names"):
        convert(model, include=[3])
    with pytest.raises(ValueError, match="backend must be one of"):
        convert(model, backend="cuda")
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        convert({"weight": torch.zeros(2, 2)})


# --------------------------------------------------------------------------- checkpoints

def test_load_linear_state_dict_into_converted_model():
    model = small_cnn()
    checkpoint = small_cnn().state_dict()  # same seed: equal values; perturb to see them load
    checkpoint = {k: v + 1 for k, v in checkpoint.items()}
    converted = convert(model)
    feedback = converted.head[0].feedback.clone()
    with pytest.warns(UserWarning, match=r"no feedback for \['features.0.feedback', 'head.0.feedback'"):
        load_linear_state_dict(converted, checkpoint)
    state = converted.state_dict()
    assert all(torch.equal(state[k], v) for k, v in checkpoint.items())
    assert torch.equal(converted.head[0].feedback, feedback)
    reference = small_cnn()
    reference.load_state_dict(checkpoint)
    x, _ = batch()
    assert torch.equal(converted(x), reference(x))


@pytest.mark.parametrize("method", ["brsf", "frsf"])
def test_load_linear_state_dict_keeps_what_the_method_adds(method):
    # brsf's seed and counter, frsf's R: like B, kept from the converted model when the
    # nn.Linear checkpoint lacks them (a strict load, not a missing-key error).
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    checkpoint = {k: v + 1 for k, v in mlp.state_dict().items()}
    converted = convert(mlp, method=method)
    own = {k: v.clone() for k, v in converted.state_dict().items() if k not in checkpoint}
    assert own and all(k.endswith(("feedback", "feedback_seed", "counter")) for k in own)
    with pytest.warns(UserWarning, match="no feedback for"):
        load_linear_state_dict(converted, checkpoint)
    state = converted.state_dict()
    assert all(torch.equal(state[k], v) for k, v in own.items())
    assert all(torch.equal(state[k], v) for k, v in checkpoint.items())


def test_converted_checkpoint_round_trips_bitwise():
    model = convert(small_cnn())
    x, target = batch()
    nn.functional.cross_entropy(model(x), target).backward()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    torch.manual_seed(123)  # another fresh model: other feedback, other weights
    restored = convert(SmallCNN())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # feedback comes from the checkpoint: no warning
        load_linear_state_dict(restored, torch.load(buffer))
    for (key, a), (key_b, b) in zip(model.state_dict().items(), restored.state_dict().items()):
        assert key == key_b and torch.equal(a, b), key
    nn.functional.cross_entropy(restored(x), target).backward()
    for a, b in zip(model.parameters(), restored.parameters()):
        assert torch.equal(a.grad, b.grad)


def test_load_linear_state_dict_mismatched_shapes():
    converted = convert(small_cnn())
    checkpoint = small_cnn().state_dict()
    checkpoint["head.2.weight"] = torch.zeros(16, 33)
    with pytest.raises(ValueError, match=r"state_dict\['head.2.weight'\] has shape \(16, 33\).*\(16, 32\)"):
        load_linear_state_dict(converted, checkpoint)
    # Other mismatches are load_state_dict's (strict by default).
    checkpoint = small_cnn().state_dict()
    del checkpoint["head.6.bias"]
    with pytest.raises(RuntimeError, match="head.6.bias"):
        load_linear_state_dict(converted, checkpoint)


def test_a_fused_activation_slot_prints_what_it_was():
    model = convert(nn.Sequential(nn.Linear(4, 3), nn.LeakyReLU(0.2), nn.Linear(3, 2)))
    assert isinstance(model[1], nn.Identity)  # passes its input through, keeps the index
    assert repr(model[1]) == "Fused(leaky_relu into 0)"
    assert "Identity()" not in repr(model)
    x = torch.randn(5, 3)
    assert model[1](x) is x
