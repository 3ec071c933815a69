"""``fa-triton train``: outputs, one-line errors, exit codes, the torchrun launcher."""

import re
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch

from fa_triton.experiments import cli
from fa_triton.experiments.mnist import MNIST_FILES
from tests.helpers import write_fake_datasets

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"
REPO = Path(__file__).resolve().parents[1]


def require_mnist() -> Path:
    if not all((DATA_DIR / "MNIST" / "raw" / name).is_file() for name in MNIST_FILES):
        pytest.skip(f"MNIST files not found under {DATA_DIR / 'MNIST' / 'raw'} (the ../shared/data folder)")
    return DATA_DIR


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_train_writes_the_table_csv_and_plot(tmp_path, capsys, restore_threads):
    import pandas as pd

    data_dir = require_mnist()
    out = tmp_path / "run"
    code = cli.main(["train", "--epochs", "2", "--device", "cpu", "--backend", "torch", "--data-dir", str(data_dir),
                     "--train-samples", "1280", "--test-samples", "500", "--lr", "3e-3", "--out", str(out),
                     "--no-download", "--threads", "1"])
    assert code == 0
    df = pd.read_csv(out / "metrics.csv")
    assert list(df.columns) == ["method", "model", "dataset", "seed", "epoch", "lr", "loss_train", "loss_test",
                                "acc_train", "acc_test", "seconds", "angle_1", "angle_2", "angle_3",
                                "grad_angle_1", "grad_angle_2", "grad_angle_3"]
    assert list(df["epoch"]) == [1, 2] and set(df["method"]) == {"fa"} and set(df["seed"]) == {0}
    assert df["acc_test"].iloc[-1] > 0.3  # 40 steps: well above chance (0.1)
    png = (out / "training.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    assert (out / "checkpoints" / "seed0.pt").is_file()
    assert "epochs = 2" in (out / "config.toml").read_text()

    captured = capsys.readouterr()
    printed = captured.out
    assert "loss_train" in printed and "acc_test" in printed and "angle_3" in printed
    # Numbers in the table are rounded to 3 digits.
    table = printed.split("at the last epoch")[0]
    decimals = [len(number.split(".")[1]) for number in re.findall(r"\d+\.\d+", table)]
    assert decimals and max(decimals) <= 3
    assert f"{df['acc_test'].iloc[-1]:.3f}".rstrip("0") in table
    # 40 steps are too few for FA: one line says so, with the number of steps.
    assert "warning: only 40 optimizer steps" in captured.err


@pytest.mark.parametrize(
    "argv, match",
    [
        (["train", "--epochs", "0"], "--epochs: expected a positive integer, got '0'"),
        (["train", "--backend", "cudnn"], "--backend: invalid choice: 'cudnn'"),
        (["train", "--lr", "fast"], "--lr: expected a positive finite number, got 'fast'"),
        (["train", "--seeds", "0,x"], "--seeds: seeds must be comma-separated integers, got '0,x'"),
        (["train", "--method", "hebb"], "--method: invalid choice: 'hebb'"),
        (["train", "--dataset", "imagenet"], "--dataset: invalid choice: 'imagenet'"),
        (["train", "--nproc", "-2"], "--nproc: expected a positive integer"),
        (["fit"], "invalid choice: 'fit'"),
        (["train", "--resume", "--overwrite"], "--overwrite: not allowed with argument --resume"),
        (["reproduce", "tutorial", "--overwrite", "--resume"], "--resume: not allowed with argument --overwrite"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(argv, match, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fa-triton")
    assert match in err


def test_missing_data_exits_1_with_one_line(tmp_path, capsys):
    code = cli.main(["train", "--device", "cpu", "--data-dir", str(tmp_path / "nowhere"), "--no-download",
                     "--out", str(tmp_path / "run")])
    assert code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("fa-triton: error: MNIST not found")
    assert "--data-dir" in err and all(name in err for name in MNIST_FILES)


def test_reproduce_with_an_empty_methods_list_exits_1_naming_the_rules(capsys):
    assert cli.main(["reproduce", "tutorial", "--methods", ""]) == 1  # not "all of them"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fa-triton: error: --methods : tutorial has the rules fa")


class _Stop(Exception):
    """Raised by a stand-in for the runner: the config it got is all the test needs."""


def _config_of(monkeypatch, argv):
    seen = {}

    def fake_run(config, **kwargs):
        seen["config"], seen["kwargs"] = config, kwargs
        raise _Stop

    monkeypatch.setattr("fa_triton.experiments.runner.run", fake_run)
    with pytest.raises(_Stop):
        cli.main(argv)
    return seen["config"], seen["kwargs"]


def test_no_cuda_graph_option(monkeypatch, tmp_path):
    for argv, expected in ((["train"], None), (["train", "--no-cuda-graph"], False)):
        config, _ = _config_of(monkeypatch, [*argv, "--out", str(tmp_path / "run")])
        assert config.cuda_graph is expected


def test_train_defaults_are_the_tutorial(monkeypatch):
    config, kwargs = _config_of(monkeypatch, ["train"])
    assert (config.model, config.method, config.dataset, config.optimizer) == ("mlp", "fa", "mnist", "adam")
    assert (config.lr, config.batch_size, config.epochs, config.seeds, config.init) == (3e-4, 64, 10, (0,), "kaiming")
    assert config.out == "runs/mnist" and kwargs == {"resume": False, "overwrite": False}


def test_flags_override_the_config_file(monkeypatch, tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text('model = "lenet"\nmethod = "usf"\noptimizer = "sgd"\nmomentum = 0.9\nmilestones = [50, 75]\n'
                    "seeds = [0, 1, 2]\nbatch-size = 32\nlr = 1\n")
    config, _ = _config_of(monkeypatch, ["train", "--config", str(path), "--method", "frsf", "--seed", "7"])
    assert (config.model, config.method, config.optimizer, config.momentum) == ("lenet", "frsf", "sgd", 0.9)
    assert config.milestones == (50, 75) and config.seeds == (7,) and config.batch_size == 32
    assert config.lr == 1.0 and isinstance(config.lr, float)


def test_resume_starts_from_the_runs_own_config(monkeypatch, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.toml").write_text('model = "lenet"\nmethod = "kp"\nepochs = 3\nout = "elsewhere"\n')
    config, kwargs = _config_of(monkeypatch, ["train", "--resume", "--out", str(out), "--epochs", "5"])
    assert (config.model, config.method, config.epochs, config.out) == ("lenet", "kp", 5, str(out))
    assert kwargs["resume"] is True


@pytest.mark.parametrize(
    "text, match",
    [
        ('metod = "fa"\n', "unknown setting 'metod'"),
        ("lr = -1\n", "lr must be positive"),
        ('method = "hebb"\n', "method must be one of"),
        ("seeds = [1, 1]\n", "seeds must be distinct"),
        ("lr = \n", "is not valid TOML"),
        ("batch-size = 32\nbatch_size = 16\n", "'batch-size' and 'batch_size' both set batch_size: keep one"),
    ],
)
def test_a_bad_config_file_is_one_line_naming_the_setting(tmp_path, capsys, text, match):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    assert cli.main(["train", "--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and match in err and str(path) in err  # the file is named too


def test_a_config_folder_is_one_line(tmp_path, capsys):
    assert cli.main(["train", "--config", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err == f"fa-triton: error: config file {tmp_path} is a folder, not a TOML file\n"


def test_the_written_config_reads_back_and_names_the_automatic_settings(tmp_path):
    from fa_triton.experiments.config import RunConfig, load_toml

    config = RunConfig(model="lenet", dataset="cifar10", seeds=(3, 4), milestones=(5, 8))
    path = tmp_path / "config.toml"
    path.write_text(config.to_toml())
    assert load_toml(path) == config
    text = path.read_text()
    assert "# augment: automatic, here true" in text and "# test_samples: not set (its default)" in text


def test_bare_command_prints_usage_and_version(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: fa-triton") and "train" in out and "reproduce" in out
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert re.match(r"fa-triton \d+\.\d+\.\d+ \(torch ", capsys.readouterr().out)


def test_missing_train_extra_is_one_line(monkeypatch, capsys, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    assert cli.main(["train", "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs matplotlib" in err and '.[train]"' in err
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error when CUDA is absent")
def test_cuda_without_a_gpu_exits_1(tmp_path, capsys):
    code = cli.main(["train", "--device", "cuda", "--data-dir", str(tmp_path), "--out", str(tmp_path / "run")])
    assert code == 1
    assert "CUDA is not available" in capsys.readouterr().err


def test_python_dash_m_runs_the_cli(tmp_path):
    result = subprocess.run([sys.executable, "-m", "fa_triton", "train", "--epochs", "-1"], capture_output=True,
                            text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["fa-triton train: error: argument --epochs: expected a positive "
                                                  "integer, got '-1'"]


def test_console_script_is_registered():
    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    if "fa-triton" not in scripts:
        pytest.skip("fa_triton is not installed with its entry points (pip install -e .)")
    assert scripts["fa-triton"] == "fa_triton.experiments.cli:main"


def test_nproc_starts_torchrun_with_the_same_arguments(monkeypatch, tmp_path):
    calls = []
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(cli.subprocess, "call", lambda command: calls.append(command) or 0)
    data = str(write_fake_datasets(tmp_path, 64, 16))
    argv = ["train", "--nproc", "2", "--epochs", "3", "--nproc=2", "--device", "cpu", "--out", "runs/x",
            "--data-dir", data]
    assert cli.main(argv) == 0
    (command,) = calls
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--standalone" in command and "--nproc_per_node=2" in command
    assert command[command.index("-m", 3):] == ["-m", "fa_triton", "train", "--epochs", "3", "--device", "cpu",
                                                "--out", "runs/x", "--data-dir", data]


def test_nproc_with_missing_data_is_one_line_before_torchrun(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(cli.subprocess, "call", lambda command: pytest.fail("torchrun started"))
    argv = ["train", "--nproc", "2", "--no-download", "--data-dir", str(tmp_path / "missing"), "--out",
            str(tmp_path / "run")]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fa-triton: error: MNIST not found")
    assert not (tmp_path / "run").exists() and not (tmp_path / "missing").exists()


def test_readme_commands_parse():
    # The training commands in README, docs/mnist.md and docs/experiments.md must stay accepted by the parser.
    readme = (REPO / "README.md").read_text()
    text = readme + (REPO / "docs" / "mnist.md").read_text() + (REPO / "docs" / "experiments.md").read_text()
    text = re.sub(r"\\\n\s*", " ", text)  # shell line continuations
    commands = [c for c in re.findall(r"(?:fa-triton|-m fa_triton) (train [^\n`#]*)", text)
                if "..." not in c and "--help" not in c]
    assert any("--data-dir ../shared/data --out runs/mnist" in c for c in commands)
    main_job = 'python3 -m pip install -e ".[train]" && fa-triton train --data-dir ../shared/data --out runs/mnist'
    assert main_job in readme
    for command in commands:
        args = cli.build_parser().parse_args(command.split())
        assert args.command == "train"
