"""``fa_triton.experiments.runner``: every model on generated data in each dataset's format, seeds,
resume (bitwise on the CPU), NaN stop, nothing left behind by an early failure, and the three
bugs a training loop can hide (test metrics from the training set, one batch order for every
epoch, training in eval mode)."""

import math
import sys

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fa_triton import FALinear
from fa_triton.experiments import runner
from fa_triton.experiments.config import RunConfig
from tests.helpers import torch_threads, write_fake_datasets

N_TRAIN, N_TEST = 256, 64


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_fake_datasets(tmp_path_factory.mktemp("data"), N_TRAIN, N_TEST)


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):
        yield


def config(data_dir, tmp_path, **changes) -> RunConfig:
    base = RunConfig(device="cpu", backend="torch", data_dir=str(data_dir), download=False, progress=False,
                     out=str(tmp_path / "run"), epochs=2, batch_size=32)
    return base.replace(**changes)


def run_quietly(cfg, **kwargs) -> pd.DataFrame:
    with pytest.warns(UserWarning, match="optimizer steps in all"):  # the generated sets are tiny
        return runner.run(cfg, **kwargs)


def _finite(df, columns):
    return all(math.isfinite(v) for c in columns for v in df[c])


@pytest.mark.parametrize(
    "model, method, dataset",
    [
        ("mlp", "dfa", "mnist"),
        ("mlp", "kp", "fashion-mnist"),
        ("mlp", "brsf", "cifar10"),
        ("lenet", "fa", "mnist"),
        ("lenet", "usf", "fashion-mnist"),
        ("lenet", "wm", "cifar10"),
        ("lenet", "dfa", "cifar10"),
        ("resnet20", "frsf", "cifar10"),
        ("resnet20", "dfa", "mnist"),
        ("resnet56", "backprop", "fashion-mnist"),
        ("tests.test_runner:small_factory", "fa", "mnist"),
    ],
)
def test_every_model_trains_on_each_dataset(data_dir, tmp_path, model, method, dataset):
    epochs = 1 if model == "resnet56" else 2
    cfg = config(data_dir, tmp_path, model=model, method=method, dataset=dataset, epochs=epochs,
                 optimizer="sgd", lr=0.01, momentum=0.9)
    df = run_quietly(cfg)
    assert list(df["epoch"]) == list(range(1, epochs + 1))
    assert set(df["method"]) == {method} and set(df["model"]) == {model} and set(df["dataset"]) == {dataset}
    splits = ["train", "val", "test"] if dataset == "cifar10" else ["train", "test"]
    assert [c for c in df.columns if c.startswith("acc_")] == [f"acc_{s}" for s in splits]
    assert _finite(df, [f"loss_{s}" for s in splits])
    angles = [c for c in df.columns if c.startswith("angle_")]
    grad_angles = [c for c in df.columns if c.startswith("grad_angle_")]
    # The W-B angle where the rule has a B of W's shape; the gradient's angle to backprop's for every rule but BP.
    assert bool(angles) == (method not in ("backprop", "dfa"))
    assert bool(grad_angles) == (method != "backprop")
    assert all(0 <= v <= 180 for c in angles + grad_angles for v in df[c])
    if grad_angles:  # the output layer's gradient is exact
        assert df[grad_angles[-1]].abs().max() < 1e-3
    out = tmp_path / "run"
    assert pd.read_csv(out / "metrics.csv").shape == df.shape
    assert (out / "training.png").stat().st_size > 10_000


class SmallNet(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.flat = nn.Flatten()
        self.hidden = nn.Linear(28 * 28, 32)
        self.out = nn.Linear(32, num_classes)

    def forward(self, x):
        return self.out(F.relu(self.hidden(self.flat(x))))


def small_factory(num_classes, method):
    """A user's model: plain nn layers (the runner converts them), called with what it asks for."""
    assert method == "fa"
    return SmallNet(num_classes)


def test_the_tutorial_trains_by_the_same_loop_as_mnist_train(data_dir, tmp_path):
    from fa_triton.experiments.mnist import train

    cfg = config(data_dir, tmp_path)
    df = run_quietly(cfg, write=False)
    with pytest.warns(UserWarning):
        table = train(epochs=2, batch_size=32, device="cpu", backend="torch", data_dir=data_dir, download=False,
                      progress=False)
    assert list(table.columns) == ["epoch", "loss_train", "loss_test", "acc_train", "acc_test", "seconds",
                                   "angle_1", "angle_2", "angle_3"]
    columns = [c for c in table.columns if c != "seconds"]
    pd.testing.assert_frame_equal(table[columns], df[columns])


def test_seeds(data_dir, tmp_path):
    cfg = config(data_dir, tmp_path, model="lenet", seeds=(3, 5))
    df = run_quietly(cfg)
    assert list(zip(df["seed"], df["epoch"])) == [(3, 1), (3, 2), (5, 1), (5, 2)]
    metrics = ["loss_train", "acc_test", "angle_1"]
    assert not df[df.seed == 3][metrics].reset_index(drop=True).equals(df[df.seed == 5][metrics].reset_index(drop=True))
    again = run_quietly(cfg.replace(seeds=(5,)), write=False)
    columns = [c for c in df.columns if c != "seconds"]
    pd.testing.assert_frame_equal(again[columns], df[df.seed == 5][columns].reset_index(drop=True))
    summary = pd.read_csv(tmp_path / "run" / "summary.csv").set_index("metric")
    last = df[df.epoch == 2]["loss_test"]
    assert summary.loc["loss_test", "mean"] == pytest.approx(last.mean())
    assert summary.loc["loss_test", "std"] == pytest.approx(last.std(ddof=1)) and summary.loc["loss_test", "std"] > 0
    assert summary.loc["loss_test", "seeds"] == 2


class Interrupt(Exception):
    pass


@pytest.mark.parametrize(
    "changes",
    [
        # batch norm, augmentation (its own generator), brsf's draws, a milestone, two seeds
        {"model": "lenet", "method": "brsf", "dataset": "cifar10", "optimizer": "sgd", "lr": 0.05, "momentum": 0.9,
         "milestones": (2,), "seeds": (0, 1), "epochs": 3},
        # wm's mirror steps draw from torch's global RNG; DFA draws B at its first training forward
        {"model": "mlp", "method": "wm", "epochs": 3},
        {"model": "lenet", "method": "dfa", "dataset": "fashion-mnist", "epochs": 3},
    ],
)
def test_resume_gives_the_uninterrupted_run_bitwise(data_dir, tmp_path, monkeypatch, changes):
    whole = run_quietly(config(data_dir, tmp_path / "a", **changes))

    cfg = config(data_dir, tmp_path / "b", **changes)
    real_epoch = runner.SeedRun.train_epoch
    calls = {"n": 0}

    def interrupted(self, progress=None):
        calls["n"] += 1
        if calls["n"] == 2:  # during the first seed's second epoch
            raise Interrupt
        return real_epoch(self, progress)

    monkeypatch.setattr(runner.SeedRun, "train_epoch", interrupted)
    with pytest.raises(Interrupt), pytest.warns(UserWarning):
        runner.run(cfg)
    monkeypatch.setattr(runner.SeedRun, "train_epoch", real_epoch)
    assert len(pd.read_csv(tmp_path / "b" / "run" / "metrics.csv")) == 1
    with pytest.raises(ValueError, match="unfinished run .* pass --resume"):
        runner.run(cfg)
    resumed = run_quietly(cfg, resume=True)
    columns = [c for c in whole.columns if c != "seconds"]
    pd.testing.assert_frame_equal(resumed[columns], whole[columns], check_exact=True)
    on_disk = pd.read_csv(tmp_path / "b" / "run" / "metrics.csv")
    assert len(on_disk) == len(whole)


def test_resume_refuses_another_experiment(data_dir, tmp_path):
    cfg = config(data_dir, tmp_path, epochs=1)
    run_quietly(cfg)
    with pytest.raises(ValueError, match=r"checkpoint of another run .*lr 0\.0003 -> 0\.001"):
        runner.run(cfg.replace(lr=1e-3), resume=True)
    more = run_quietly(cfg.replace(epochs=2), resume=True)  # more epochs: the same experiment, continued
    assert list(more["epoch"]) == [1, 2]
    with pytest.raises(ValueError, match=r"planned for 2 epochs, and epochs=1 would end it early: resume with "
                                         r"--epochs 2 or more"):
        runner.run(cfg, resume=True)
    with pytest.raises(FileNotFoundError, match="holds no checkpoints"):
        runner.run(cfg.replace(out=str(tmp_path / "empty")), resume=True)
    (tmp_path / "bare" / "checkpoints").mkdir(parents=True)  # a folder, but nothing to resume
    with pytest.raises(FileNotFoundError, match="holds no checkpoints"):
        runner.run(cfg.replace(out=str(tmp_path / "bare")), resume=True)


def test_a_new_run_replaces_only_what_a_run_wrote(data_dir, tmp_path):
    cfg = config(data_dir, tmp_path, epochs=1, seeds=(0, 1))
    out = tmp_path / "run"
    run_quietly(cfg)
    (out / "notes.txt").write_text("the user's")
    (out / "checkpoints" / "my_model.ckpt").write_text("the user's")
    with pytest.warns(UserWarning, match=r"replaced an earlier run's results in .*metrics\.csv.*checkpoints/seed1\.pt"):
        run_quietly(cfg.replace(seeds=(0,)))
    assert (out / "notes.txt").read_text() == (out / "checkpoints" / "my_model.ckpt").read_text() == "the user's"
    assert sorted(p.name for p in (out / "checkpoints").glob("seed*.pt")) == ["seed0.pt"]  # seed 1's is gone
    assert set(pd.read_csv(out / "metrics.csv")["seed"]) == {0}


class ExplodingNet(nn.Module):
    """Finite until its 12th training forward, then inf: a loss that blows up mid-epoch."""

    def __init__(self):
        super().__init__()
        self.layer = FALinear(28 * 28, 10, activation="identity", backend="torch")
        self.calls = 0

    def forward(self, x):
        y = self.layer(x.flatten(1))
        if self.training and torch.is_grad_enabled():
            self.calls += 1
            if self.calls >= 12:
                return y * float("inf")
        return y


def exploding_factory():
    return ExplodingNet()


def test_a_non_finite_loss_stops_with_one_line_and_keeps_the_last_good_checkpoint(data_dir, tmp_path, capsys):
    from fa_triton.experiments import cli

    out = tmp_path / "run"
    # 8 steps per epoch: the 12th forward is step 4 of epoch 2
    code = cli.main(["train", "--model", "tests.test_runner:exploding_factory", "--device", "cpu", "--backend",
                     "torch", "--data-dir", str(data_dir), "--no-download", "--no-progress", "--batch-size", "32",
                     "--epochs", "3", "--out", str(out)])
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("fa-triton: error: the training loss is ") and "at epoch 2, step 4 of 8" in err
    assert f"the last good checkpoint is {out / 'checkpoints' / 'seed0.pt'} (epoch 1)" in err
    assert list(pd.read_csv(out / "metrics.csv")["epoch"]) == [1]
    assert torch.load(out / "checkpoints" / "seed0.pt", weights_only=False)["epoch"] == 1


class SecondExplodes(nn.Module):
    """Every second model built gives an infinite loss in training."""

    built = 0

    def __init__(self):
        super().__init__()
        SecondExplodes.built += 1
        self.explodes = SecondExplodes.built % 2 == 0
        self.flat, self.out = nn.Flatten(), nn.Linear(784, 10)

    def forward(self, x):
        y = self.out(self.flat(x))
        return y * float("inf") if self.explodes and self.training else y


def second_explodes_factory():
    return SecondExplodes()


def test_a_non_finite_loss_of_a_later_seed_says_whose_checkpoint_is_missing(data_dir, tmp_path, capsys):
    from fa_triton.experiments import cli

    SecondExplodes.built = 0
    out = tmp_path / "run"
    code = cli.main(["train", "--model", "tests.test_runner:second_explodes_factory", "--device", "cpu", "--backend",
                     "torch", "--data-dir", str(data_dir), "--no-download", "--no-progress", "--batch-size", "32",
                     "--epochs", "1", "--seeds", "0,1", "--out", str(out)])
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "(seed 1, fa" in err and err.endswith("no checkpoint of seed 1 was written")
    assert (out / "checkpoints" / "seed0.pt").exists() and not (out / "checkpoints" / "seed1.pt").exists()


def test_a_run_that_fails_before_its_first_epoch_leaves_nothing(data_dir, tmp_path, capsys):
    from fa_triton.experiments import cli

    out = tmp_path / "run"
    failures = [
        ["--data-dir", str(tmp_path / "nowhere"), "--no-download"],  # no data
        ["--data-dir", str(data_dir), "--no-download", "--model", "tests.test_runner:no_such_factory"],
        ["--data-dir", str(data_dir), "--no-download", "--model", "tests.test_runner:exploding_factory",
         "--batch-size", "16"],  # NaN in epoch 1
    ]
    if not torch.cuda.is_available():
        failures.append(["--data-dir", str(data_dir), "--device", "cuda"])
    for argv in failures:
        code = cli.main(["train", "--device", "cpu", "--backend", "torch", "--no-progress", "--out", str(out),
                         *argv])
        assert code == 1, argv
        lines = capsys.readouterr().err.splitlines()  # the error, after the few-steps warning where data loaded
        assert lines[-1].startswith("fa-triton: error: ") and all(line.startswith("fa-triton: ") for line in lines)
        assert not out.exists(), argv


def test_too_few_steps_warns_with_the_number_of_steps(data_dir, tmp_path):
    with pytest.warns(UserWarning, match=r"only 16 optimizer steps in all \(256 training images // batch 32 = 8 per "
                                         r"epoch, 2 epochs\); fa needs about 1000"):
        runner.run(config(data_dir, tmp_path), write=False)
    long_enough = RunConfig(epochs=10, train_samples=60_000)  # the tutorial: 9,370 steps
    assert runner.warn_few_steps(long_enough, 60_000) is None
    assert runner.warn_few_steps(long_enough.replace(method="backprop", epochs=1), 6400) is None
    backprop = runner.warn_few_steps(long_enough.replace(method="backprop", epochs=1), 3200)  # 50 steps
    assert "backprop needs about 100 or more;" in backprop and "feedback alignment" not in backprop


# -------------------------------------------------- what the loop must not get wrong (planted bugs)

class Spy(nn.Module):
    """The tutorial's MLP, recording every training forward: its input rows and whether the
    module was in training mode."""

    def __init__(self, method="fa"):
        super().__init__()
        self.net = nn.Sequential(FALinear(784, 32, method=method, backend="torch"),
                                 FALinear(32, 10, activation="identity", method=method, backend="torch"))
        self.seen = []

    def forward(self, x):
        if torch.is_grad_enabled():
            self.seen.append((self.training, x.detach().clone()))
        return self.net(x)


def test_metrics_are_the_models_on_each_split(data_dir, tmp_path):
    cfg = config(data_dir, tmp_path, epochs=1)
    spy = Spy()
    df = run_quietly(cfg, model=spy, write=False)
    data = runner.load_data(cfg, torch.device("cpu"))
    spy.eval()
    with torch.no_grad():
        for split, x, y in (("train", data.x_train, data.y_train), ("test", data.x_test, data.y_test)):
            logits = spy.net(x)
            loss = F.cross_entropy(logits.double(), y).item()
            acc = (logits.argmax(1) == y).double().mean().item()
            assert df[f"loss_{split}"].iloc[-1] == pytest.approx(loss, rel=1e-6), split
            assert df[f"acc_{split}"].iloc[-1] == pytest.approx(acc, abs=1e-9), split
    # and the two splits are not the same numbers (a test set read from the training set would be)
    assert df["loss_test"].iloc[-1] != df["loss_train"].iloc[-1]


def test_each_epoch_reshuffles_and_trains_in_training_mode(data_dir, tmp_path):
    cfg = config(data_dir, tmp_path, epochs=3, method="brsf")
    spy = Spy(method="brsf")
    run_quietly(cfg, model=spy, write=False)
    steps = N_TRAIN // cfg.batch_size
    # Per epoch: the training steps' forwards, then the gradient alignment's two (FA's, backprop's).
    assert len(spy.seen) == 3 * (steps + 2)
    training = [spy.seen[e * (steps + 2) + i] for e in range(3) for i in range(steps)]
    assert all(mode for mode, _ in training), "the training forwards ran in eval mode"
    epochs = [torch.cat([x for _, x in training[e * steps:(e + 1) * steps]]) for e in range(3)]
    data = runner.load_data(cfg, torch.device("cpu"))
    for rows in epochs:  # each epoch: every training image once (none twice), batch_size * steps of them
        matches = (rows[:, None, :] == data.x_train[None]).all(-1)
        assert (matches.sum(1) >= 1).all() and (matches.float().argmax(1).unique().numel() == len(rows))
    assert not torch.equal(epochs[0], epochs[1]) and not torch.equal(epochs[1], epochs[2])
    # brsf redraws R at every training step: the counter counts them
    assert all(int(layer.counter) == 3 * steps for layer in spy.net)


def small_mlp_factory(num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.ReLU(), nn.Linear(16, num_classes))


def test_factory_errors_name_the_model(data_dir, tmp_path):
    for spec, match in (("no_such_module_xyz:build", "cannot import 'no_such_module_xyz'"),
                        ("tests.test_runner:nothing_here", "has no callable 'nothing_here'")):
        with pytest.raises(ValueError, match=match):  # before the data are read (none here)
            runner.run(config(tmp_path / "no-data", tmp_path, model=spec), write=False)


def broken_factory(num_classes):
    raise RuntimeError("oops in the factory")


def test_a_factory_that_raises_is_named_with_its_call(data_dir, tmp_path):
    with pytest.raises(ValueError, match=r"model 'tests.test_runner:broken_factory': the factory raised RuntimeError: "
                                         r"oops in the factory, called as broken_factory\(num_classes=10\)"):
        runner.run(config(data_dir, tmp_path, model="tests.test_runner:broken_factory"), write=False)


def test_a_factory_module_in_the_current_folder_is_found(data_dir, tmp_path, monkeypatch):
    (tmp_path / "my_models_xyz.py").write_text(
        "from torch import nn\n\ndef plain(num_classes):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(784, num_classes))\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    df = run_quietly(config(data_dir, tmp_path, model="my_models_xyz:plain", epochs=1), write=False)
    assert list(df["epoch"]) == [1]


@pytest.mark.parametrize("method, model, backend", [("fa", "mlp", "torch"), ("kp", "mlp", "torch"),
                                                    ("backprop", "mlp", "torch"), ("fa", "lenet", "torch"),
                                                    ("fa", "mlp", "triton")])
def test_seeds_together_match_the_seeds_one_by_one(data_dir, tmp_path, method, model, backend, launches):
    """One torch.func pass per step for every seed: each seed's rows as its own run's, within
    fp32 rounding (the stacked GEMMs round differently); outputs and checkpoints as usual. On
    backend="triton" the pass is the kernels' stacked launches (vmap, then plain autograd)."""
    # The interpreter runs the kernels: a smaller run there (2 seeds, 1 epoch of 4 steps).
    small = dict(seeds=(0, 1), epochs=1, train_samples=128) if backend == "triton" else dict(seeds=(0, 1, 2))
    cfg = config(data_dir, tmp_path, method=method, model=model, backend=backend, **small)
    separate = run_quietly(cfg, write=False)
    # One by one: the kernels' single-model launches on triton (no model axis), none on the reference.
    assert bool(launches) == (backend == "triton")
    assert all(len(grid) < 3 or grid[2] == 1 for _, grid in launches), launches
    together = run_quietly(cfg.replace(together=True))
    # The kernels' stacked launches (the members on the grid's third axis), or none on the reference.
    assert {name for name, grid in launches if len(grid) == 3 and grid[2] == len(cfg.seeds)} == (
        {"forward_kernel", "local_error_kernel", "backward_input_kernel", "backward_weight_kernel"}
        if backend == "triton" else set())
    assert list(together["seed"]) == list(separate["seed"]) and list(together["epoch"]) == list(separate["epoch"])
    for column in [c for c in separate.columns if c.startswith(("loss_", "acc_", "angle_", "grad_angle_"))]:
        torch.testing.assert_close(torch.tensor(together[column].to_numpy()), torch.tensor(separate[column].to_numpy()),
                                   rtol=1e-4, atol=1e-4, msg=lambda text, column=column: f"{column}: {text}")
    out = tmp_path / "run"
    assert {p.name for p in (out / "checkpoints").iterdir()} == {f"seed{seed}.pt" for seed in cfg.seeds}
    assert (out / "metrics.csv").exists() and (out / "summary.csv").exists()


@pytest.mark.parametrize("changes, reason", [
    ({"method": "brsf"}, "Philox seed is a Python int"),
    ({"method": "wm"}, "global random stream"),
    ({"method": "dfa"}, "no torch.func form"),
    ({"model": "resnet20"}, "buffers a forward may update .*cannot keep per seed"),
    ({"model": "tests.test_runner:instance_norm_model"}, "buffers a forward may update"),
    ({"model": "tests.test_runner:dropout2d_model"}, r"random modules \(Dropout2d\)"),
])
def test_seeds_together_refuse_what_one_pass_cannot_keep_per_seed(data_dir, tmp_path, changes, reason):
    cfg = config(data_dir, tmp_path, seeds=(0, 1), together=True, **changes)
    with pytest.raises(ValueError, match=f"together: the seeds cannot train in one pass: .*{reason}"):
        runner.run(cfg, write=False)


def test_seeds_together_resume_as_if_never_stopped(data_dir, tmp_path):
    cfg = config(data_dir, tmp_path, seeds=(0, 1), together=True)
    whole = run_quietly(cfg.replace(out=str(tmp_path / "whole")))
    run_quietly(cfg.replace(epochs=1))
    resumed = run_quietly(cfg, resume=True)
    columns = [c for c in whole.columns if c != "seconds"]
    assert whole[columns].equals(resumed[columns])


def instance_norm_model(num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 8), nn.ReLU(), nn.Unflatten(1, (2, 4)),
                         nn.InstanceNorm1d(2, track_running_stats=True), nn.Flatten(), nn.Linear(8, num_classes))


def dropout2d_model(num_classes):
    return nn.Sequential(nn.Dropout2d(0.1), nn.Flatten(), nn.Linear(784, num_classes))


def test_together_is_one_process_and_can_be_turned_off_for_a_resume(data_dir, tmp_path):
    with pytest.raises(ValueError, match="together trains the seeds in one process, got nproc=2"):
        config(data_dir, tmp_path, seeds=(0, 1), together=True, nproc=2)
    from fa_triton.experiments import cli

    args = cli.build_parser().parse_args(["train", "--seeds", "0,1", "--no-together", "--resume"])
    assert args.together is False
