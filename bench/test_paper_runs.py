"""bench/akrout_mnist.py and bench/biotorch_mnist.py on a small synthetic MNIST: the CSV gets one
row per method and epoch, a rerun resumes from the checkpoint without duplicating rows, and
bench.results.replace_rows keeps the rows it does not replace."""

import csv
import json

import pytest
import torch

from bench import akrout_mnist, biotorch_mnist
from bench.results import replace_rows
from fa_triton import mnist


def _fake_mnist(*args, **kwargs):
    gen = torch.Generator().manual_seed(0)
    return mnist.MNISTTensors(torch.rand(512, 784, generator=gen), torch.randint(0, 10, (512,), generator=gen),
                              torch.rand(128, 784, generator=gen), torch.randint(0, 10, (128,), generator=gen))


def _rows(path):
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_replace_rows_keeps_other_keys(tmp_path):
    path = tmp_path / "r.csv"
    columns = ("method", "epoch", "value")
    replace_rows(path, columns, [{"method": "fa", "epoch": 1, "value": 1.0},
                                 {"method": "kp", "epoch": 1, "value": 2.0}], key=("method",))
    replace_rows(path, columns, [{"method": "fa", "epoch": 2, "value": 3.0}], key=("method",))
    rows = _rows(path)
    assert [(r["method"], r["epoch"], r["value"]) for r in rows] == [("kp", "1", "2.0"), ("fa", "2", "3.0")]
    assert not list(tmp_path.glob("*.tmp"))


def test_akrout_runs_and_resumes(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(akrout_mnist, "load_mnist", _fake_mnist)
    args = ["--methods", "fa,kp,wm", "--csv", str(tmp_path / "a.csv"), "--state-dir", str(tmp_path / "state"),
            "--checkpoint-every", "1"]
    assert akrout_mnist.main([*args, "--epochs", "1"]) == 0
    assert akrout_mnist.main([*args, "--epochs", "2"]) == 0  # resumes after epoch 1
    rows = _rows(tmp_path / "a.csv")
    assert sorted((r["method"], r["epoch"]) for r in rows) == [(m, e) for m in ("fa", "kp", "wm") for e in "12"]
    for row in rows:
        assert 0.0 <= float(row["acc_test"]) <= 100.0
        assert 0.0 <= float(row["angle_1"]) <= 180.0
    out = capsys.readouterr().out
    assert "fa: resuming after epoch 1" in out
    assert [line.split()[0] for line in out.splitlines()[-3:]] == ["fa", "wm", "kp"]  # the summary table


def test_biotorch_runs_and_resumes(monkeypatch, tmp_path):
    monkeypatch.setattr(biotorch_mnist, "load_mnist", _fake_mnist)
    lr_file = tmp_path / "lr.json"
    lr_file.write_text(json.dumps({"fa": {"lr": 0.01}, "dfa": {"lr": 0.01}}))
    args = ["--methods", "fa,dfa", "--epochs", "2", "--milestones", "1", "--lr-file", str(lr_file),
            "--csv", str(tmp_path / "b.csv"), "--state-dir", str(tmp_path / "state"), "--no-progress"]
    assert biotorch_mnist.main(args) == 0
    first = _rows(tmp_path / "b.csv")
    assert biotorch_mnist.main(args) == 0  # everything done: nothing retrained, no duplicate rows
    rows = _rows(tmp_path / "b.csv")
    assert rows == first
    assert sorted((r["method"], r["epoch"]) for r in rows) == [(m, e) for m in ("dfa", "fa") for e in "12"]
    lrs = {(r["method"], r["epoch"]): float(r["lr"]) for r in rows}
    assert lrs[("fa", "1")] == 0.01 and abs(lrs[("fa", "2")] - 0.001) < 1e-12  # divided by 10 after epoch 1


def test_a_checkpoint_resumes_only_its_own_run(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(akrout_mnist, "load_mnist", _fake_mnist)
    monkeypatch.setattr(biotorch_mnist, "load_mnist", _fake_mnist)
    common = ["--methods", "fa", "--csv", str(tmp_path / "a.csv"), "--state-dir", str(tmp_path / "a")]
    akrout_mnist.main([*common, "--epochs", "1", "--seed", "1"])
    akrout_mnist.main([*common, "--epochs", "1", "--seed", "2"])  # another seed: its own checkpoint
    assert "resuming" not in capsys.readouterr().out
    with pytest.raises(SystemExit, match="checkpoint of another run"):  # fewer images than the checkpoint's
        akrout_mnist.main([*common, "--epochs", "2", "--seed", "1", "--train-samples", "256"])
    lr_file = tmp_path / "lr.json"
    args = ["--methods", "fa", "--epochs", "1", "--lr-file", str(lr_file), "--csv", str(tmp_path / "b.csv"),
            "--state-dir", str(tmp_path / "b"), "--no-progress"]
    lr_file.write_text(json.dumps({"fa": {"lr": 0.01}}))
    biotorch_mnist.main(args)
    lr_file.write_text(json.dumps({"fa": {"lr": 0.1}}))  # a new learning rate is a new run, not a resume
    with pytest.raises(SystemExit, match="checkpoint of another run"):
        biotorch_mnist.main(args)
    with pytest.raises(SystemExit, match="needs more than 10,000"):  # --select-lr holds out 5,000 images
        biotorch_mnist.main([*args, "--select-lr", "--state-dir", str(tmp_path / "c")])
