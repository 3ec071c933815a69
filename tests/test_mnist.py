"""The founding tutorial's MNIST job: model, data, evaluation, training table, Triton-path parity."""

from pathlib import Path
from urllib.error import URLError

import pytest
import torch
import torch.nn.functional as F

from fa_triton import FALinear
from fa_triton.experiments.mnist import (
    MNIST_FILES,
    GraphedTrainStep,
    MissingDataError,
    _mean_over_batches,
    _use_cuda_graph,
    batch_indices,
    build_model,
    evaluate,
    format_table,
    load_mnist,
    resolve_device,
    train,
    train_step,
)
from tests.helpers import torch_threads

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def one_thread():
    """Training tests on one CPU thread: batch-64 matmuls gain little from a second one, and a
    second thread stalls every step while another process holds a core (shared CI machines)."""
    with torch_threads(1):
        yield


def require_mnist() -> Path:
    if not all((DATA_DIR / "MNIST" / "raw" / name).is_file() for name in MNIST_FILES):
        pytest.skip(f"MNIST files not found under {DATA_DIR / 'MNIST' / 'raw'} (the ../shared/data folder)")
    return DATA_DIR


def test_build_model_is_the_tutorials_mlp():
    model = build_model()
    layers = list(model)
    assert all(isinstance(layer, FALinear) for layer in layers)
    assert [(layer.in_features, layer.out_features) for layer in layers] == [(784, 128), (128, 64), (64, 10)]
    assert [layer.activation for layer in layers] == ["relu", "relu", "identity"]
    assert model(torch.rand(5, 784)).shape == (5, 10)


def test_build_model_arguments():
    model = build_model((10, 7, 3), ("tanh", "identity"), bias=False, backend="torch", dtype=torch.float64)
    assert [layer.activation for layer in model] == ["tanh", "identity"]
    assert all(layer.bias is None and layer.backend == "torch" for layer in model)
    assert model[0].weight.dtype == torch.float64
    with pytest.raises(ValueError, match="one entry per layer"):
        build_model((784, 10), ("relu", "relu"))
    with pytest.raises(ValueError, match="at least an input and an output"):
        build_model((784,), ())
    with pytest.raises(ValueError, match="activation"):
        build_model((4, 2), ("softmax",))


def test_mean_over_batches_counts_the_short_last_batch_as_one_batch():
    values = torch.arange(10, dtype=torch.float32)
    # batches [0..3], [4..7], [8, 9]: means 1.5, 5.5, 8.5
    assert _mean_over_batches(values, 4) == pytest.approx((1.5 + 5.5 + 8.5) / 3)
    assert _mean_over_batches(values, 5) == pytest.approx(4.5)
    assert _mean_over_batches(values, 64) == pytest.approx(4.5)


def test_evaluate_matches_a_loop_over_batches():
    torch.manual_seed(0)
    model = build_model((12, 8, 4), ("relu", "identity"))
    x, y = torch.randn(150, 12), torch.randint(0, 4, (150,))
    losses, accs = [], []
    with torch.no_grad():
        for start in range(0, 150, 64):
            logits = model(x[start:start + 64])
            losses.append(F.cross_entropy(logits, y[start:start + 64]).item())
            accs.append((logits.argmax(1) == y[start:start + 64]).float().mean().item())
    loss, acc = evaluate(model, x, y, batch_size=64, chunk=50)  # chunks that cut across batches
    assert loss == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    assert acc == pytest.approx(sum(accs) / len(accs), rel=1e-6)


def test_batch_indices_shuffle_and_drop_the_incomplete_batch():
    indices = batch_indices(1000, 64, torch.Generator().manual_seed(0))
    assert indices.shape == (15, 64)
    assert indices.unique().numel() == 15 * 64
    assert not torch.equal(indices.flatten(), torch.arange(960))
    again = batch_indices(1000, 64, torch.Generator().manual_seed(0))
    assert torch.equal(indices, again)


def test_batch_indices_shards_split_each_global_batch():
    whole = batch_indices(1000, 64, torch.Generator().manual_seed(3))
    shards = [batch_indices(1000, 64, torch.Generator().manual_seed(3), rank=r, world_size=2) for r in range(2)]
    assert all(shard.shape == (15, 32) for shard in shards)
    assert torch.equal(torch.cat(shards, dim=1), whole)


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="'tpu'"):
        resolve_device("tpu")
    with pytest.raises(ValueError, match="'meta'"):
        resolve_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"epochs": 0}, ValueError, "epochs must be positive, got 0"),
        ({"batch_size": 6.4}, TypeError, "batch_size must be an int"),
        ({"lr": -1.0}, ValueError, "lr must be a positive"),
        ({"backend": "cuda"}, ValueError, "backend must be one of"),
        ({"train_samples": 10}, ValueError, "train_samples=10 holds no complete batch of batch_size=64"),
        ({"device": "tpu"}, ValueError, "device must be"),
        ({"device": "cpu", "cuda_graph": True}, ValueError, "cuda_graph=True needs device='cuda'"),
        ({"cuda_graph": "yes"}, TypeError, "cuda_graph must be True, False or None"),
    ],
)
def test_train_rejects_bad_arguments_before_loading_data(tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        train(data_dir=tmp_path, download=False, progress=False, **kwargs)


def test_missing_data_names_the_files_and_the_option(tmp_path):
    with pytest.raises(MissingDataError) as info:
        load_mnist(tmp_path, download=False)
    message = str(info.value)
    assert "\n" not in message
    assert all(name in message for name in MNIST_FILES)
    assert str(tmp_path / "MNIST" / "raw") in message
    assert "--data-dir" in message
    with pytest.raises(MissingDataError, match="--data-dir"):
        train(epochs=1, device="cpu", data_dir=tmp_path, download=False, progress=False)


def test_failed_download_is_a_missing_data_error(tmp_path, monkeypatch):
    from torchvision.datasets import MNIST

    def no_network(self):
        raise RuntimeError(f"Error downloading train-images-idx3-ubyte.gz:\nTried {URLError('no network')}")

    monkeypatch.setattr(MNIST, "download", no_network)
    with pytest.raises(MissingDataError, match="download failed: .*Error downloading train-images") as info:
        load_mnist(tmp_path, download=True)
    assert "\n" not in str(info.value)


def test_load_mnist_tensors():
    data = load_mnist(require_mnist(), download=False)
    assert data.x_train.shape == (60000, 784) and data.x_test.shape == (10000, 784)
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64
    assert data.x_train.min() == 0 and data.x_train.max() == 1  # pixels / 255
    assert set(data.y_test.unique().tolist()) == set(range(10))
    # The MNIST folder itself is accepted as well as its parent.
    assert torch.equal(load_mnist(DATA_DIR / "MNIST", download=False).y_test, data.y_test)


def test_one_epoch_on_a_subset_learns_and_aligns(one_thread):
    data_dir = require_mnist()
    df = train(epochs=1, lr=1e-3, batch_size=32, seed=0, device="cpu", data_dir=data_dir, download=False,
               progress=False, train_samples=20000)
    assert list(df.columns) == ["epoch", "loss_train", "loss_test", "acc_train", "acc_test", "seconds",
                                "angle_1", "angle_2", "angle_3"]
    row = df.iloc[-1]
    assert row.acc_test > 0.85
    assert row.loss_test < 0.5
    # Layers 2 and 3 send the error back through their feedback matrices: W turns towards B.
    assert row.angle_2 < 85 and row.angle_3 < 85
    # Layer 1's feedback carries nothing (the input needs no gradient), so B1 has no influence
    # on training and W1 stays at a random angle to it: 90° up to ~0.2° of sampling noise.
    assert abs(row.angle_1 - 90) < 1.5


def test_same_seed_same_table(one_thread):
    data_dir = require_mnist()
    kwargs = {"epochs": 2, "device": "cpu", "data_dir": data_dir, "download": False, "progress": False,
              "train_samples": 640, "test_samples": 200}
    first, second = train(seed=0, **kwargs), train(seed=0, **kwargs)
    other = train(seed=1, **kwargs)
    columns = [c for c in first.columns if c != "seconds"]
    assert first[columns].equals(second[columns])
    assert not first[columns].equals(other[columns])
    assert list(first["epoch"]) == [1, 2]
    table = format_table(first)
    assert "0." in table and "epoch" in table


def test_train_trains_a_given_model_in_place(one_thread):
    data_dir = require_mnist()
    torch.manual_seed(5)
    model = build_model((784, 32, 10), ("relu", "identity"))
    before = model[0].weight.detach().clone()
    feedback = model[0].feedback.clone()
    df = train(epochs=1, device="cpu", data_dir=data_dir, download=False, progress=False, model=model,
               train_samples=256, test_samples=64)
    assert list(df.columns)[-2:] == ["angle_1", "angle_2"]
    assert not torch.equal(model[0].weight, before)
    assert torch.equal(model[0].feedback, feedback)  # B is fixed


def test_triton_backend_trains_like_the_reference(one_thread):
    """20 training steps through the Triton kernels (interpreter on CPU) vs the PyTorch reference."""
    data = load_mnist(require_mnist(), download=False)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: TRITON_INTERPRET=1 from conftest
    indices = batch_indices(len(data.x_train), 64, torch.Generator().manual_seed(0))[:20]
    results = {}
    for backend in ("torch", "triton"):
        torch.manual_seed(0)
        model = build_model(backend=backend, device=device)
        # lr above the tutorial's 3e-4 so that the loss leaves its initial plateau within 20 steps
        optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
        losses = []
        for idx in indices:
            loss = F.cross_entropy(model(data.x_train[idx].to(device)), data.y_train[idx].to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        results[backend] = (torch.tensor(losses), [p.detach().cpu() for p in model.parameters()])
    losses_torch, params_torch = results["torch"]
    losses_triton, params_triton = results["triton"]
    assert losses_torch[-5:].mean() < losses_torch[:5].mean() - 0.1  # it is training
    torch.testing.assert_close(losses_triton, losses_torch, atol=2e-4, rtol=1e-4)
    # Adam moves a weight by up to lr (2e-3) per step whatever its gradient's size, so rounding
    # noise in near-zero gradients can move single weights apart by a fraction of that; a
    # wrong gradient would move them by whole steps.
    for p_triton, p_torch in zip(params_triton, params_torch):
        torch.testing.assert_close(p_triton, p_torch, atol=2e-4, rtol=1e-3)


def test_progress_bar_over_the_batches(one_thread, capsys):
    data_dir = require_mnist()
    train(epochs=1, device="cpu", data_dir=data_dir, download=False, progress=True, train_samples=640,
          test_samples=100)
    captured = capsys.readouterr()
    assert "epoch 1/1" in captured.err and "/10 [" in captured.err  # a bar over 640 // 64 batches
    assert "epoch 1: loss_test" in captured.out
    train(epochs=1, device="cpu", data_dir=data_dir, download=False, progress=False, train_samples=640,
          test_samples=100)
    assert capsys.readouterr() == ("", "")


# ------------------------------------------------------------------------ CUDA-graph training

def test_cuda_graph_is_the_default_on_cuda_with_one_process():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert _use_cuda_graph(None, cpu, 1) is False
    assert _use_cuda_graph(False, cpu, 1) is False
    assert _use_cuda_graph(None, cuda, 1) is True
    assert _use_cuda_graph(False, cuda, 1) is False
    assert _use_cuda_graph(None, cuda, 2) is False  # DDP: eager, silently by default
    with pytest.warns(UserWarning, match="not supported with several processes"):
        assert _use_cuda_graph(True, cuda, 2) is False
    with pytest.raises(ValueError, match="needs device='cuda'"):
        _use_cuda_graph(True, cpu, 1)


def test_graphed_step_refuses_what_it_cannot_capture():
    model = build_model((8, 4), ("identity",))
    x, y = torch.randn(16, 8), torch.randint(0, 4, (16,))
    with pytest.raises(ValueError, match="capturable=True"):
        GraphedTrainStep(model, torch.optim.Adam(model.parameters()), x, y, 4)
    with pytest.raises(ValueError, match="CUDA device, got cpu"):
        GraphedTrainStep(model, torch.optim.Adam(model.parameters(), capturable=True), x, y, 4)


def test_train_step_is_one_optimizer_step():
    torch.manual_seed(0)
    model = build_model((8, 6, 4), ("relu", "identity"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 8), torch.randint(0, 4, (16,))
    idx = torch.arange(4, 12)
    before = [p.detach().clone() for p in model.parameters()]
    expected = F.cross_entropy(model(x[idx]), y[idx])
    expected.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    loss = train_step(model, optimizer, x, y, idx)
    assert torch.equal(loss, expected.detach())
    for p, p0, g in zip(model.parameters(), before, grads):
        torch.testing.assert_close(p.detach(), p0 - 0.1 * g)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_cuda_graphed_steps_train_like_eager_steps(backend):
    data = load_mnist(require_mnist(), download=False, device="cuda")
    indices = batch_indices(len(data.x_train), 64, torch.Generator().manual_seed(0))[:30].cuda()
    results = {}
    for graphed in (False, True):
        torch.manual_seed(0)
        model = build_model(backend=backend, device="cuda")
        optimizer = torch.optim.Adam(model.parameters(), lr=2e-3, capturable=True)
        step = GraphedTrainStep(model, optimizer, data.x_train, data.y_train, 64) if graphed else None
        losses = [(step(idx) if graphed else train_step(model, optimizer, data.x_train, data.y_train, idx)).item()
                  for idx in indices]
        results[graphed] = (torch.tensor(losses), [p.detach().clone() for p in model.parameters()])
        if graphed:
            assert step.graph is not None and step.steps == step.warmup  # captured after the warm-up
    torch.testing.assert_close(results[True][0], results[False][0], atol=2e-4, rtol=1e-4)
    for graphed_param, eager_param in zip(results[True][1], results[False][1]):
        torch.testing.assert_close(graphed_param, eager_param, atol=2e-4, rtol=1e-3)


def test_graphed_evaluation_is_for_cuda_only():
    # On the CPU evaluate's graphs are not used (nothing is captured); a captured forward refuses
    # CPU tensors by name.
    from fa_triton.experiments.training import GraphedForward

    torch.manual_seed(0)
    model = build_model().eval()
    x, y = torch.rand(30, 784), torch.randint(0, 10, (30,))
    graphs = {}
    assert evaluate(model, x, y, chunk=10, graphs=graphs) == evaluate(model, x, y, chunk=10)
    assert graphs == {}
    with pytest.raises(ValueError, match="CUDA-graphed forward needs CUDA tensors, got cpu"):
        GraphedForward(model, x)


def test_graphed_evaluation_recaptures_for_new_tensors_and_falls_back_when_capture_fails(monkeypatch):
    # The cache logic of evaluate's graphs, with a stand-in for the CUDA capture: one capture per
    # kind of rows and module mode, another once the model's tensors were replaced, and after a
    # failed capture a warning and eager evaluation of that kind from then on.
    from fa_triton.experiments import training

    captured = []

    class FakeGraph:
        def __init__(self, model, rows):
            if rows.shape[0] == 13:
                raise RuntimeError("operation not permitted when stream is capturing")
            captured.append(rows.shape)
            self.pointer = model[0].weight.data_ptr()

        def fits(self, model):
            return model[0].weight.data_ptr() == self.pointer

    monkeypatch.setattr(training, "GraphedForward", FakeGraph)
    torch.manual_seed(0)
    model = build_model().eval()
    graphs = {}
    rows = torch.rand(10, 784)
    first = training._graphed_forward(graphs, model, rows)
    assert training._graphed_forward(graphs, model, rows) is first and len(captured) == 1
    model.train()
    assert training._graphed_forward(graphs, model, rows) is not first and len(captured) == 2  # the other mode
    model.eval()
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    assert training._graphed_forward(graphs, model, rows) is not first and len(captured) == 3  # new tensors
    with pytest.warns(UserWarning, match="could not be captured in a CUDA graph.*evaluated eagerly"):
        assert training._graphed_forward(graphs, model, torch.rand(13, 784)) is None
    assert training._graphed_forward(graphs, model, torch.rand(13, 784)) is None and len(captured) == 3


@pytest.mark.cuda
def test_cuda_graphed_evaluation_equals_eager_and_follows_the_weights():
    # Full chunks replay a forward captured at their first use; the short last chunk runs
    # eagerly; an in-place weight update (an optimizer's step) is seen by the next replay.
    torch.manual_seed(0)
    model = build_model(device="cuda").eval()
    x = torch.rand(250, 784, device="cuda")
    y = torch.randint(0, 10, (250,), device="cuda")
    graphs = {}
    for _ in range(2):
        got = evaluate(model, x, y, chunk=100, graphs=graphs)
        want = evaluate(model, x, y, chunk=100)
        assert abs(got[0] - want[0]) < 1e-5 and got[1] == want[1]
        assert list(graphs) == [((100, 784), torch.float32)]
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.5)


@pytest.mark.cuda
def test_cuda_train_graphed_and_eager_give_the_same_table():
    kwargs = {"epochs": 2, "device": "cuda", "data_dir": require_mnist(), "download": False, "progress": False,
              "train_samples": 6400, "test_samples": 1000}
    graphed, eager = train(cuda_graph=None, **kwargs), train(cuda_graph=False, **kwargs)
    columns = [c for c in graphed.columns if c not in ("epoch", "seconds")]
    assert (graphed[columns] - eager[columns]).abs().max().max() < 2e-3


@pytest.mark.cuda
def test_cuda_compile_reduce_overhead_runs_fa_models():
    torch.manual_seed(0)
    model = build_model(device="cuda")
    compiled = torch.compile(model, mode="reduce-overhead")
    x = torch.rand(64, 784, device="cuda")
    for _ in range(3):  # records, then replays the CUDA graph
        compiled(x).sum().backward()
    torch.testing.assert_close(compiled(x), model(x), atol=1e-4, rtol=1e-4)
