"""``fa-triton train --nproc 2`` (torchrun, gloo on 2 CPU processes) for models beyond the MLP:
the runner checks that every rank ends with rank 0's weights; without batch norm, the run is
one process's up to rounding (each global batch split in two, gradients averaged)."""

import os
import sys

import pandas as pd
import pytest
import torch
import torch.distributed as dist

from fa_triton.experiments import datasets
from tests.test_mnist_ddp import _run_bounded

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available in this build")


def _train(tmp_path, data_dir, out, extra, epochs=2):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    command = [sys.executable, "-m", "fa_triton", "train", "--device", "cpu", "--backend", "torch",
               "--epochs", str(epochs), "--batch-size", "32", "--data-dir", str(data_dir), "--no-download",
               "--no-progress", "--threads", "1", "--out", str(out), *extra]
    result = _run_bounded(command, tmp_path, env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result, pd.read_csv(out / "metrics.csv").drop(columns="seconds")


def test_two_processes_train_lenet_by_dfa_as_one_process(tmp_path):
    # augmentation drawn for the whole batch on each rank, DFA's B drawn at the first forward
    datasets.write_fake("cifar10", tmp_path / "data", n_train=256, n_test=64)
    rule = ["--model", "lenet", "--method", "dfa", "--dataset", "cifar10"]
    result, two = _train(tmp_path, tmp_path / "data", tmp_path / "two", [*rule, "--nproc", "2"])
    assert result.stdout.count("wrote ") == 1  # rank 0 prints and writes
    assert list(two["epoch"]) == [1, 2]
    _, one = _train(tmp_path, tmp_path / "data", tmp_path / "one", rule)
    numbers = [c for c in one.columns if one[c].dtype.kind == "f"]
    torch.testing.assert_close(torch.tensor(two[numbers].to_numpy()), torch.tensor(one[numbers].to_numpy()),
                               atol=2e-3, rtol=1e-3)


def test_two_processes_train_a_batch_norm_resnet_by_brsf(tmp_path):
    # Batch norm normalizes each rank's half batch (not one process's training), but rank 0's
    # running statistics reach every rank: the runner's check that all ranks end equal passes.
    datasets.write_fake("mnist", tmp_path / "data", n_train=128, n_test=32)
    rule = ["--model", "resnet20", "--method", "brsf", "--dataset", "mnist", "--nproc", "2"]
    result, two = _train(tmp_path, tmp_path / "data", tmp_path / "two", rule, epochs=1)
    assert result.stdout.count("wrote ") == 1
    assert list(two["epoch"]) == [1] and two["loss_test"].notna().all()
