"""bench/peers.py at a tiny size: what it measures and prints, with or without BioTorch importable."""

import sys

import pytest

from bench import peers


def _biotorch_importable() -> bool:
    return peers.import_biotorch()[0] is not None


def test_measure_times_every_method_beside_nn_backprop():
    samples, paired, skipped = peers.measure(steps=1, rounds=2, warmup_steps=1, biotorch=None, threads=None)
    chains = [m for m in peers.METHODS if m != "dfa"]  # the per-layer chain: FA methods only
    assert set(samples) == {(None, "nn"), *((m, "fa_triton") for m in peers.METHODS),
                            *((m, "per_layer") for m in chains)}
    assert len(samples[(None, "nn")]) == 2 * len(peers.METHODS)  # once per method group and round
    assert all(len(samples[(m, "fa_triton")]) == 2 for m in peers.METHODS)
    assert set(paired) == {(m, "nn") for m in peers.METHODS} | {(m, "per_layer") for m in chains} and not skipped
    rows = peers.summarize(samples, paired)
    assert [row["method"] for row in rows] == list(peers.METHODS)
    for row in rows:
        assert row["biotorch"] is None and row["x_biotorch"] is None
        assert row["fa_triton"][0] >= row["fa_triton"][1] > 0 and row["x_nn"] > 0
        assert (row["x_per_layer"] is None) == (row["method"] == "dfa")
    goals = peers.goals(rows)
    assert [met for _, met, _ in goals][0] is None  # BioTorch unmeasured
    assert all(met in (True, False) for _, met, _ in goals[1:])


def test_goals_read_the_ratios():
    def row(method, x_biotorch, x_nn):
        return {"method": method, "x_biotorch": x_biotorch, "x_nn": x_nn}

    rows = [row("fa", 0.9, 1.05), row("dfa", 1.0, 0.99)]
    assert [met for _, met, _ in peers.goals(rows)] == [True, True, True]
    rows = [row("fa", 1.01, 1.06), row("dfa", 0.5, 1.0)]
    assert [met for _, met, _ in peers.goals(rows)] == [False, False, False]
    rows = [row("fa", 0.9, 1.0), row("dfa", None, 0.5)]  # one BioTorch row unmeasured, none over
    assert [met for _, met, _ in peers.goals(rows)] == [None, True, True]


def test_quick_run_without_biotorch(capsys):
    assert peers.main(["--quick", "--no-biotorch", "--methods", "fa,dfa", "--optimizer", "sgd", "--threads", "0"]) == 0
    out = capsys.readouterr().out
    assert "| fa |" in out and "| dfa |" in out and "| usf |" not in out
    assert "BioTorch skipped: --no-biotorch" in out
    assert "fa <= 1.05x backprop's (nn)" in out and "DFA's step < backprop's (nn)" in out


def test_quick_run_with_whatever_biotorch_there_is(capsys):
    assert peers.main(["--quick", "--methods", "backprop,fa,usf,frsf,brsf,dfa", "--threads", "0"]) == 0
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line.startswith("| ") and "method" not in line]
    assert len(table) == len(peers.METHODS)
    if _biotorch_importable():
        assert "BioTorch not measured" not in out.splitlines()[0]
        assert all(line.split("|")[4].strip() != "-" for line in table)
    else:
        assert "BioTorch skipped: import biotorch failed" in out
        assert all(line.split("|")[4].strip() == "-" for line in table)


def test_a_missing_biotorch_path_is_a_skip_with_its_reason(tmp_path, monkeypatch):
    if _biotorch_importable():
        pytest.skip("biotorch is importable here; an empty path cannot hide it")
    monkeypatch.setattr(sys, "path", list(sys.path))  # import_biotorch prepends the path
    biotorch, reason = peers.import_biotorch(str(tmp_path))
    assert biotorch is None and "ModuleNotFoundError" in reason


def test_unknown_method_is_refused():
    with pytest.raises(SystemExit):
        peers.main(["--quick", "--methods", "kp"])
