"""``fa-triton reproduce``: every protocol in its quick form on generated data in the dataset's
format (the real Fashion-MNIST and CIFAR-10 cannot be downloaded here), its settings against
the published protocol, and ours printed beside theirs."""

import re

import pandas as pd
import pytest

from fa_triton.experiments import cli, datasets, published, reproduce
from tests.helpers import torch_threads, write_fake_datasets


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_fake_datasets(tmp_path_factory.mktemp("data"))


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):
        yield


def test_list_with_a_name_lists_that_protocol(capsys):
    assert cli.main(["reproduce", "--list", "akrout-mnist"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("akrout-mnist: ") and "biotorch" not in out.split("published:")[0]
    assert cli.main(["reproduce", "--list", "imagenet"]) == 1
    assert "no protocol 'imagenet'" in capsys.readouterr().err


def _reproduce(capsys, data_dir, tmp_path, name, *extra):
    argv = ["reproduce", name, "--quick", "--device", "cpu", "--backend", "torch", "--data-dir", str(data_dir),
            "--no-download", "--no-progress", "--out", str(tmp_path / name), *extra]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    # Quick forms are short by design: the table's head says so, no few-steps warning per rule.
    assert "optimizer steps" not in captured.err and "QUICK RUN" in captured.out
    if name != "akrout-mnist":  # --no-progress hides the bar, not the epoch lines a log needs
        assert re.search(r"^epoch 1: loss_test \d\.\d{3} acc_test", captured.out, re.M)
        rules = re.findall(rf"^{name}: (\S+)$", captured.out, re.M)  # each rule's epoch lines headed by it
        assert len(rules) != 1 and len(set(rules)) == len(rules)
    return captured.out


def test_list_names_every_protocol_with_its_source(capsys):
    assert cli.main(["reproduce", "--list"]) == 0
    out = capsys.readouterr().out
    for name in ("tutorial", "akrout-mnist", "biotorch-mnist", "biotorch-fashion-mnist", "biotorch-cifar10-resnet20"):
        assert re.search(rf"^{name}: ", out, re.M), name
    assert out.count("published: ") == 5 and "arxiv.org/abs/2108.13446" in out and "arxiv.org/abs/1904.05391" in out


def test_the_protocols_are_the_published_ones():
    # The settings the papers and configs state (BioTorch: Benchmarks.md and benchmark_configs/).
    cifar = {m: reproduce.PROTOCOLS["biotorch-cifar10-resnet20"].config(m, False) for m in
             reproduce.PROTOCOLS["biotorch-cifar10-resnet20"].methods}
    for method, config in cifar.items():
        assert (config.model, config.dataset, config.optimizer, config.momentum, config.weight_decay) == \
               ("resnet20", "cifar10", "sgd", 0.9, 1e-4)
        assert (config.batch_size, config.epochs, config.milestones, config.init) == (128, 250, (100, 150, 200),
                                                                                     "xavier")
        assert config.lr == (0.001 if method == "dfa" else 0.1)
        assert config.validation == "auto" and config.uses_augmentation and config.train_samples is None
    assert len(datasets.validation_indices("cifar10", 50_000)) == 5000  # 45k / 5k
    for name, dataset in (("biotorch-mnist", "mnist"), ("biotorch-fashion-mnist", "fashion-mnist")):
        for method in reproduce.PROTOCOLS[name].methods:
            config = reproduce.PROTOCOLS[name].config(method, False)
            assert (config.model, config.dataset, config.optimizer, config.momentum, config.weight_decay) == \
                   ("lenet", dataset, "sgd", 0.9, 1e-3)
            assert (config.batch_size, config.epochs, config.milestones, config.init) == (64, 100, (50, 75), "xavier")
            assert config.validation == "none" and not config.uses_augmentation
    tutorial = reproduce.PROTOCOLS["tutorial"].config("fa", False)
    assert (tutorial.model, tutorial.method, tutorial.dataset, tutorial.optimizer, tutorial.lr, tutorial.batch_size,
            tutorial.epochs) == ("mlp", "fa", "mnist", "adam", 3e-4, 64, 10)
    for protocol in reproduce.PROTOCOLS.values():  # every rule has a published number
        assert set(protocol.methods) == set(protocol.published.values) or protocol.name == "tutorial"


def test_tutorial_quick(capsys, data_dir, tmp_path):
    out = _reproduce(capsys, data_dir, tmp_path, "tutorial")
    assert "QUICK RUN" in out and "rasmuskh.github.io/Bender.jl" in out
    rows = pd.read_csv(tmp_path / "tutorial" / "fa" / "metrics.csv")
    line = next(line for line in out.splitlines() if line.startswith("acc_test@1 "))
    assert line.split()[1:] == [f"{rows['acc_test'].iloc[0]:.3f}", "0.884"]
    assert next(line for line in out.splitlines() if line.startswith("acc_test@10 ")).split()[1:] == ["-", "0.959"]


def _error_line(out, method):
    return next(line for line in out.splitlines() if line.startswith(f"{method} ")).split()


def test_biotorch_mnist_quick_all_rules(capsys, data_dir, tmp_path):
    out = _reproduce(capsys, data_dir, tmp_path, "biotorch-mnist")
    assert "QUICK RUN" in out and "Benchmarks.md" in out
    for method, theirs in published.BIOTORCH_MNIST.values.items():
        rows = pd.read_csv(tmp_path / "biotorch-mnist" / method / "metrics.csv")
        assert list(rows["epoch"]) == [1] and rows["lr"].iloc[0] == published.BIOTORCH_MNIST_LR[method]
        ours = f"{100 * (1 - rows['acc_test'].iloc[-1]):.2f}"
        assert _error_line(out, method) == [method, ours, "(1)", ours, f"{theirs:.2f}"]


def test_biotorch_fashion_mnist_quick(capsys, data_dir, tmp_path):
    out = _reproduce(capsys, data_dir, tmp_path, "biotorch-fashion-mnist", "--methods", "fa,dfa")
    assert [line.split()[0] for line in out.splitlines() if line.startswith(("fa ", "dfa "))] == ["fa", "dfa"]
    assert _error_line(out, "dfa")[-1] == "12.81"
    rows = pd.read_csv(tmp_path / "biotorch-fashion-mnist" / "fa" / "metrics.csv")
    assert set(rows["dataset"]) == {"fashion-mnist"} and set(rows["model"]) == {"lenet"}


def test_biotorch_cifar10_resnet20_quick_picks_the_best_validation_epoch(capsys, data_dir, tmp_path):
    out = _reproduce(capsys, data_dir, tmp_path, "biotorch-cifar10-resnet20", "--methods", "usf")
    rows = pd.read_csv(tmp_path / "biotorch-cifar10-resnet20" / "usf" / "metrics.csv")
    assert "acc_val" in rows.columns and list(rows["epoch"]) == [1]
    assert _error_line(out, "usf")[-1] == "10.05"
    assert set(rows["lr"]) == {0.1}


def test_akrout_mnist_quick(capsys, data_dir, tmp_path):
    out = _reproduce(capsys, data_dir, tmp_path, "akrout-mnist", "--methods", "fa,kp")
    rows = pd.read_csv(tmp_path / "akrout-mnist" / "akrout-mnist.csv")
    assert sorted(zip(rows["method"], rows["epoch"])) == [("fa", 1), ("fa", 2), ("kp", 1), ("kp", 2)]
    fa = _error_line(out, "fa")
    last = rows[(rows.method == "fa") & (rows.epoch == 2)].iloc[0]
    assert fa == ["fa", f"{last['acc_test']:.2f}", "97.80", f"{last['angle_1']:.1f}", "40.0"]


def test_bad_names_are_one_line(capsys):
    assert cli.main(["reproduce", "biotorch-imagenet"]) == 1
    assert "no protocol 'biotorch-imagenet'; the protocols: tutorial, akrout-mnist" in capsys.readouterr().err
    assert cli.main(["reproduce", "akrout-mnist", "--methods", "fa,dfa"]) == 1
    assert "akrout-mnist has the rules backprop, fa, wm, kp" in capsys.readouterr().err
    assert cli.main(["reproduce"]) == 1
    assert "reproduce needs a protocol name or --list" in capsys.readouterr().err


def test_missing_data_names_the_folder(capsys, tmp_path):
    code = cli.main(["reproduce", "biotorch-cifar10-resnet20", "--quick", "--methods", "fa", "--device", "cpu",
                     "--data-dir", str(tmp_path), "--no-download", "--out", str(tmp_path / "out")])
    assert code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "CIFAR-10 not found" in err and str(tmp_path / "cifar-10-batches-py") in err
    assert not (tmp_path / "out").exists()
