"""bench/mnist_epoch_time.py on a small synthetic MNIST: every CPU variant is timed, the ratios
and train()'s report are printed, the CSV has a row per variant and epoch."""

import csv

import pytest
import torch

from bench import mnist_epoch_time
from fa_triton.experiments import datasets


@pytest.mark.filterwarnings("ignore:only .* optimizer steps:UserWarning")  # a timing run, not a training one
def test_epoch_times_on_the_cpu(tmp_path, capsys):
    # A small generated MNIST in the real file format, read by the bench and by train() alike.
    datasets.write_fake("mnist", tmp_path, n_train=640, n_test=128)
    threads = torch.get_num_threads()
    try:
        mnist_epoch_time.main(["--rounds", "2", "--chunk", "4", "--threads", "1", "--train-epochs", "1",
                               "--data-dir", str(tmp_path), "--csv", str(tmp_path / "epochs.csv")])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    cpu_variants = [name for name, (_, _, cuda_only) in mnist_epoch_time.VARIANTS.items() if not cuda_only]
    for name in cpu_variants:
        assert f"wall         {name}" in out
    assert "fa_triton.mnist.train, 1 epochs on cpu: sum of the epochs' seconds" in out
    with open(tmp_path / "epochs.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["variant"], r["round"]) for r in rows) == sorted((v, str(i)) for v in cpu_variants for i in (1, 2))
    assert all(float(r["value"]) > 0 and r["steps"] == "10" for r in rows)
