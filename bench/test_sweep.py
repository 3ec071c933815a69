"""bench/sweep.py without a GPU: the dry run (interpreter, tiny shapes) of both modes, its CSV,
and the table it emits for kernels/tuned_tables.py."""

import csv
import importlib.util

import pytest
import torch

from bench import sweep
from fa_triton.kernels import tuning


@pytest.fixture(scope="module")
def dry_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("sweep") / "sweep.csv"
    assert sweep.main(["--dry-run", "--workers", "1", "--output", str(path)]) == 0
    assert sweep.main(["--dry-run", "--mode", "chosen", "--workers", "0", "--output", str(path)]) == 0
    with path.open() as f:
        return path, list(csv.DictReader(f))


def test_dry_run_times_every_job_and_candidate(dry_csv):
    _, rows = dry_csv
    assert rows and set(rows[0]) == set(sweep.COLUMNS)
    for target in sweep.targets(dry_run=True):
        jobs = {r["job"] for r in rows if int(r["M"]) == target.M and r["dtype"] == target.dtype}
        expected = {"forward", "backward_input", "backward_weight"} | (
            {"backward_weight_delta"} if target.activation != "identity" else set())
        assert jobs == expected, target
    assert all(r["status"] == "ok" for r in rows), [r["status"] for r in rows if r["status"] != "ok"]
    assert all(float(r["err"]) <= sweep.TOLERANCE[r["dtype"]] for r in rows)
    assert all(float(r["cublas_ms"]) > 0 and float(r["ms"]) > 0 for r in rows)
    assert {r["tma"] for r in rows if r["chosen"] == "False"} == {"True", "False"}  # aligned shapes get TMA
    assert any(int(r["split"]) > 1 for r in rows)
    chosen = [r for r in rows if r["chosen"] == "True"]
    assert len(chosen) == sum(len(sweep.Problem(t, "cpu").jobs()) for t in sweep.targets(dry_run=True))
    assert all(r["config"] for r in chosen)  # the config the launcher picked is reported


def test_emitted_table_is_what_select_config_reads(dry_csv, tmp_path, monkeypatch):
    path, rows = dry_csv
    table_path = tmp_path / "tuned_tables.py"
    assert sweep.main(["--emit-table", str(path), "--table-path", str(table_path)]) == 0
    spec = importlib.util.spec_from_file_location("emitted", table_path)
    emitted = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(emitted)
    candidates = [r for r in rows if r["chosen"] == "False"]
    assert len(emitted.TABLE) == len({(r["gpu"], r["key"]) for r in candidates})
    for key, fields in emitted.TABLE.items():
        fastest = min((r for r in candidates if (r["gpu"],) + eval(r["key"]) == key), key=lambda r: float(r["ms"]))
        assert tuning.LaunchConfig(**fields).block_rows == int(fastest["block_rows"])
    # The key format is the tuner's: a GPU with this name would use the entry without tuning.
    key, fields = next(iter(emitted.TABLE.items()))
    kernel, dtype, precision, activation, bias_grad, store, tma, rows_, cols, red = key[1:]
    batch_axis = "red" if kernel == "backward_weight" else "rows"
    monkeypatch.setattr(tuning, "TABLE", {key: tuning.LaunchConfig(**fields)})
    monkeypatch.setattr(tuning, "sm_count", lambda device: 132)
    monkeypatch.setattr(tuning, "device_name", lambda device: key[0])
    monkeypatch.setattr(tuning, "tma_supported", lambda device: tma)
    monkeypatch.setattr(tuning, "TUNE_MIN_MACS", 1)
    monkeypatch.setattr(tuning, "autotune", lambda configs, launch: pytest.fail("tuned a key the table has"))
    config, final = tuning.select_config(
        kernel, rows_, cols, red, batch_axis, dtype=getattr(torch, dtype), device=torch.device("cuda", 0),
        precision=precision, activation=activation, bias_grad=bias_grad, store=store, tma_layout=tma,
        interpreted=False, launch=None)
    assert final and config == tuning.LaunchConfig(**fields)
