"""``fa_triton.experiments.files``: checkpoints that resume only their own run, written atomically,
and result CSVs whose rows other runs' rewrites keep."""

import csv

import pytest
import torch

from fa_triton.experiments.files import load_run, replace_rows, save_run


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


def test_a_checkpoint_resumes_only_its_own_run(tmp_path):
    path = tmp_path / "sub" / "run.pt"
    assert load_run(path, {"lr": 0.1}) is None  # nothing yet
    save_run(path, {"lr": 0.1, "seed": 0}, epoch=3, weights=torch.ones(2))
    state = load_run(path, {"lr": 0.1, "seed": 0})
    assert state["epoch"] == 3 and torch.equal(state["weights"], torch.ones(2))
    with pytest.raises(ValueError, match="checkpoint of another run"):
        load_run(path, {"lr": 0.2, "seed": 0})
    assert load_run(path, {"lr": 0.2}, compare=lambda recorded, run: None) is not None  # the caller decides
    assert not list(path.parent.glob("*.tmp"))


def test_unreadable_checkpoints_are_one_line_errors(tmp_path):
    path = tmp_path / "broken.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="is not a readable checkpoint") as info:
        load_run(path, {})
    assert "\n" not in str(info.value)
    torch.save({"epoch": 1}, path)  # a torch file, but not one of ours
    with pytest.raises(ValueError, match="is not a checkpoint of a run"):
        load_run(path, {})
