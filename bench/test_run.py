"""CI checks of the benchmark script, its CSV, report and plots (tiny sizes; CPU, or GPU when present)."""

import csv
import shutil

import pytest
import torch

from bench import cases as C
from bench import plot, report, run
from bench.conftest import HAS_CUDA
from bench.results import COLUMNS, append_rows, make_row, read_rows
from bench.timing import _quantiles, time_cpu

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EXPECTED_COLUMNS = ["kernel", "provider", "mode", "dtype", "M", "N", "K", "metric", "unit", "p50", "p20", "p80",
                    "device_name", "torch", "triton", "commit", "timestamp"]
TINY = ["--preset", "smoke", "--quiet", "--device", "cpu"]


def _header(path):
    with open(path, newline="") as f:
        return next(csv.reader(f))


def _rows(path, **match):
    return [r for r in read_rows(path) if all(r[k] == v for k, v in match.items())]


@pytest.fixture(scope="module")
def smoke_csv(tmp_path_factory):
    """One smoke run of the square and MLP families: every provider but compiled, every mode."""
    path = tmp_path_factory.mktemp("bench") / "smoke.csv"
    assert run.main([*TINY, "--families", "square,mlp", "--output", str(path)]) == 0
    return path


def test_csv_has_the_issue_columns(smoke_csv):
    assert list(COLUMNS) == EXPECTED_COLUMNS
    assert _header(smoke_csv) == EXPECTED_COLUMNS
    rows = read_rows(smoke_csv)
    assert rows and all(list(r) == EXPECTED_COLUMNS for r in rows)
    device = rows[0]["device_name"]
    assert device.startswith("CPU: ") and all(r["device_name"] == device for r in rows)
    assert all(r["torch"] == torch.__version__ and r["timestamp"].endswith("Z") and r["commit"] for r in rows)


def test_every_provider_and_mode_is_timed(smoke_csv):
    timed = {(r["provider"], r["mode"], r["dtype"]) for r in _rows(smoke_csv, metric="time")}
    for provider in ("reference", "fa_triton_auto", "backprop", "fa_triton_interpreter"):
        for mode in C.MODES:
            assert (provider, mode, "fp32") in timed, (provider, mode)
    # bf16: torch providers run, the interpreter is skipped with its reason.
    assert ("reference", "forward", "bf16") in timed and ("fa_triton_auto", "forward", "bf16") in timed
    skipped = _rows(smoke_csv, metric="skipped", provider="fa_triton_interpreter", dtype="bf16")
    assert skipped and all("bf16" in r["unit"] for r in skipped)


def test_rows_are_consistent(smoke_csv):
    rows = read_rows(smoke_csv)
    for r in rows:
        if r["metric"] in ("skipped", "failed") or r["metric"] == "speedup_vs_reference":
            continue
        p50, p20, p80 = float(r["p50"]), float(r["p20"]), float(r["p80"])
        assert 0 < p20 <= p50 <= p80, r
    units = {r["metric"]: r["unit"] for r in rows}
    assert units["time"] == "ms" and units["throughput"] == "TFLOP/s" and units["bandwidth"] == "GB/s"
    assert units["pct_roofline"] == "%" and units["speedup_vs_reference"] == "x"
    # Ceilings measured in the same run.
    assert _rows(smoke_csv, kernel="peak_mm", dtype="fp32") and _rows(smoke_csv, kernel="peak_copy")
    # Throughput is FLOPs / time: check one row against the work model.
    time_row = _rows(smoke_csv, provider="reference", mode="forward_backward", dtype="fp32", metric="time")[0]
    tput = _rows(smoke_csv, provider="reference", mode="forward_backward", dtype="fp32", metric="throughput")[0]
    case = C.Case("square", int(time_row["M"]), int(time_row["N"]), int(time_row["K"]))
    expected = C.flops(case, "forward_backward") / (float(time_row["p50"]) * 1e-3) / 1e12
    assert float(tput["p50"]) == pytest.approx(expected, rel=1e-4)
    for r in _rows(smoke_csv, provider="reference", metric="speedup_vs_reference"):
        assert float(r["p50"]) == 1.0


def test_report_and_plot(smoke_csv, tmp_path, capsys):
    assert report.main([str(smoke_csv)]) == 0
    out = capsys.readouterr().out
    assert "auto ms | triton ms | reference ms | auto x ref | triton x ref | % of peak" in out
    assert "[interpreter]" in out
    # The GPU targets are never claimed from CPU rows.
    assert "no GPU rows: every target unmeasured" in out and "PASS" not in out and "FAIL" not in out
    assert out.count("unmeasured") >= 4
    paths = plot.plot_csv(smoke_csv, tmp_path, prefix="smoke")
    assert sorted(p.name for p in paths) == ["smoke_mlp.png", "smoke_square.png"]
    for path in paths:
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000


def test_plot_command(smoke_csv, tmp_path, capsys):
    assert plot.main([str(smoke_csv), "--out-dir", str(tmp_path)]) == 0
    assert len(list(tmp_path.glob("*.png"))) == 2
    empty = tmp_path / "empty.csv"
    append_rows(empty, [])
    assert plot.main([str(empty), "--out-dir", str(tmp_path)]) == 1


def test_tutorial_layers_with_plot(tmp_path):
    # --plot draws next to the CSV; the tutorial family has its own figure.
    out = tmp_path / "t.csv"
    assert run.main([*TINY, "--families", "tutorial", "--modes", "forward", "--dtypes", "fp32", "--providers",
                     "reference,backprop", "--no-peaks", "--plot", "--output", str(out)]) == 0
    assert {r["kernel"] for r in _rows(out, metric="time")} == {"fa_linear_relu", "fa_linear_identity"}
    assert [p.name.split("_", 1)[1] for p in tmp_path.glob("*.png")] == ["tutorial.png"]


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None and not HAS_CUDA,
                    reason="torch.compile on the CPU needs a C++ compiler")
def test_compiled_provider(tmp_path):
    out = tmp_path / "compiled.csv"
    # One layer case (the MLP's compiled train step is in test_benchmarks.py's smoke run).
    code = run.main([*TINY, "--families", "square", "--modes", "forward_backward", "--dtypes", "fp32",
                     "--providers", "reference,compiled", "--no-peaks", "--output", str(out)])
    assert code == 0
    assert {r["mode"] for r in _rows(out, provider="compiled", metric="time")} == {"forward_backward"}


def test_failures_are_recorded_not_raised(tmp_path, monkeypatch):
    def broken_compile(fn):
        raise RuntimeError("no C++ compiler\nsecond line")

    monkeypatch.setattr(C, "_compile", broken_compile)
    out = tmp_path / "failed.csv"
    args = [*TINY, "--families", "square", "--modes", "forward", "--dtypes", "fp32", "--no-peaks", "--output", str(out)]
    assert run.main([*args, "--providers", "reference,compiled"]) == 0  # compiled may fail "where it does not work"
    failed = _rows(out, provider="compiled", metric="failed")
    assert [r["unit"] for r in failed] == ["RuntimeError: no C++ compiler"]
    assert failed[0]["p50"] == ""

    def broken_layer(provider, activation):
        raise ValueError("broken backprop")

    monkeypatch.setattr(C, "layer_function", broken_layer)
    assert run.main([*args, "--providers", "backprop"]) == 1  # a provider that must work
    assert _rows(out, provider="backprop", metric="failed")[0]["unit"] == "ValueError: broken backprop"


def test_time_budget_stops_new_measurements(tmp_path, capsys):
    out = tmp_path / "budget.csv"
    assert run.main(["--preset", "smoke", "--device", "cpu", "--no-peaks", "--time-budget", "0",
                     "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "time budget of 0 s reached" in printed and "no case was timed" in printed
    assert not out.exists() or not _rows(out, metric="time")


def test_gpu_check_plan_puts_the_targets_first():
    args = run.parse_args(["--preset", "gpu-check", "--device", "cpu"])
    plan = run.gpu_check_plan(args)
    squares = [(i.case.M, i.dtype, i.mode) for i in plan[:6]]
    assert squares == [(n, d, "forward_backward") for d in ("bf16", "fp16", "tf32") for n in (8192, 4096)]
    providers = ("reference", "fa_triton_auto", "fa_triton", "backprop")
    assert all(i.case.family == "square" and i.providers == providers for i in plan[:6])
    assert [(i.case.family, i.case.M, i.dtype, i.mode) for i in plan[6:12]] == (
        [("tutorial", 8192, "fp32", "forward_backward")] * 3 + [("tutorial", 64, "fp32", "forward_backward")] * 3)
    assert [(i.case.family, i.case.M, i.mode) for i in plan[12:14]] == [("mlp", 64, "train_step"),
                                                                      ("mlp", 8192, "train_step")]
    assert not any("compiled" in i.providers for i in plan)  # not in the preset: too slow for 6 minutes
    assert len(plan) == len(set(plan))
    # Every provider of the full grid is timed somewhere in the plan.
    timed = {(i.case, i.dtype, i.mode, p) for i in plan for p in i.providers}
    assert {(i.case, i.dtype, i.mode, p) for i in run.grid_plan(args) for p in i.providers} <= timed
    # torch.compile, when asked for, comes after every eager group.
    compiled = run.gpu_check_plan(run.parse_args(["--preset", "gpu-check", "--device", "cpu", "--providers",
                                                  "reference,fa_triton_auto,compiled"]))
    first = next(n for n, i in enumerate(compiled) if i.providers == ("compiled",))
    assert [i.providers for i in compiled[:first]] == [("reference", "fa_triton_auto")] * first
    narrowed = run.parse_args(["--preset", "gpu-check", "--device", "cpu", "--dtypes", "fp16", "--families", "square"])
    assert {(i.dtype, i.case.family) for i in run.gpu_check_plan(narrowed)} == {("fp16", "square")}


def test_ratio_uses_an_earlier_reference_time(tmp_path):
    # A group timed without the reference (as gpu-check times torch.compile last) still gets its ratio.
    args = run.parse_args([*TINY, "--no-peaks", "--dtypes", "fp32"])
    env = dict(device_name="cpu", torch="t", triton="tr", commit="c", timestamp="2026-01-01T00:00:00Z")
    case = C.Case("square", 16, 16, 16)
    times = {}
    run.run_item(run.Item(case, "fp32", "forward", ("reference",)), args, env, {}, lambda *a: None, times)
    rows, errors = run.run_item(run.Item(case, "fp32", "forward", ("backprop",)), args, env, {}, lambda *a: None,
                                times)
    assert not errors and set(times) == {(case, "fp32", "forward")}
    ratio = [r for r in rows if r["metric"] == "speedup_vs_reference"]
    time_row = [r for r in rows if r["metric"] == "time"][0]
    assert float(ratio[0]["p50"]) == pytest.approx(times[(case, "fp32", "forward")] / float(time_row["p50"]),
                                                   rel=1e-4)


def test_bad_arguments():
    with pytest.raises(SystemExit, match="providers"):
        run.parse_args(["--providers", "reference,cublas", "--device", "cpu"])
    with pytest.raises(ValueError, match="mode"):
        C.build(C.Case("square", 16, 16, 16), "reference", "train_step", "fp32", "cpu")


def test_appending_to_a_foreign_csv_is_refused(tmp_path):
    path = tmp_path / "other.csv"
    path.write_text("a,b\n1,2\n")
    env = dict(device_name="x", torch="t", triton="tr", commit="c", timestamp="2026-01-01T00:00:00Z")
    row = make_row(env, kernel="k", provider="p", mode="forward", dtype="fp32", M=1, N=1, K=1, metric="time",
                   unit="ms", p50=1.0, p20=1.0, p80=1.0)
    with pytest.raises(ValueError, match="columns"):
        append_rows(path, [row])


def test_work_model():
    case = C.Case("square", 64, 32, 16)
    assert C.flops(case, "forward") == 2 * 64 * 32 * 16
    assert C.flops(case, "backward") == 4 * 64 * 32 * 16
    assert C.flops(case, "forward_backward") == 6 * 64 * 32 * 16
    mlp = C.Case("mlp", 8, 10, 784)
    # Every layer: forward + grad_W, and grad_x except for the first layer.
    assert C.flops(mlp, "train_step") == 2 * 8 * (784 * 128 * 2 + 128 * 64 * 3 + 64 * 10 * 3)
    assert C.min_bytes(case, "forward", 2) == 2 * (64 * 16 + 32 * 16 + 32 + 64 * 32)


def test_providers_compute_the_same_layer():
    # The benchmark compares equal work: same forward everywhere; FA and backprop differ only in grad_x.
    case = C.Case("tutorial", 6, 5, 7, "relu")
    results = {}
    for provider in ("reference", "backprop", "fa_triton", "fa_triton_auto"):
        if C.unsupported_reason(case, provider, "fp32", torch.device("cpu")):
            continue
        bench = C.build(case, provider, "forward_backward", "fp32", "cpu", seed=3)
        bench.fn()
        x, weight, bias = bench.grad_to_none[0], *bench.grad_to_none[-2:]
        y = C.layer_function(provider, "relu")(x, weight, bias, torch.zeros_like(weight))
        results[provider] = (y.detach(), weight.grad, bias.grad, x.grad)
    reference = results["reference"]
    for y, grad_w, grad_b, _ in results.values():
        torch.testing.assert_close(y, reference[0])
        torch.testing.assert_close(grad_w, reference[1])
        torch.testing.assert_close(grad_b, reference[2])
    assert not torch.allclose(results["backprop"][3], reference[3])  # W vs the feedback matrix


def test_cpu_timer_resets_before_each_call():
    calls = []
    p50, p20, p80 = time_cpu(lambda: calls.append("fn"), lambda: calls.append("reset"), warmup_ms=0, rep_ms=1)
    assert 0 <= p20 <= p50 <= p80
    assert calls[0::2] == ["reset"] * (len(calls) // 2) and calls[1::2] == ["fn"] * (len(calls) // 2)
    assert _quantiles([5.0, 1.0, 3.0, 2.0, 4.0]) == (3.0, pytest.approx(1.8), pytest.approx(4.2))


@pytest.mark.cuda
def test_cuda_run(tmp_path):
    # The GPU paths: do_bench timers, loop timer, ceilings, real fa_triton rows.
    out = tmp_path / "cuda.csv"
    assert run.main(["--preset", "smoke", "--quiet", "--device", "cuda", "--dtypes", "fp32,bf16",
                     "--providers", "reference,fa_triton_auto,fa_triton,backprop", "--output", str(out)]) == 0
    timed = {(r["provider"], r["mode"], r["dtype"]) for r in _rows(out, metric="time")}
    assert ("fa_triton", "train_step", "bf16") in timed and ("fa_triton", "backward", "fp32") in timed
    assert ("fa_triton_auto", "train_step", "bf16") in timed and ("fa_triton_auto", "forward_backward", "fp32") in timed
    peak = _rows(out, kernel="peak_mm", dtype="bf16")[0]
    assert float(peak["p50"]) > 0 and peak["device_name"] == torch.cuda.get_device_name()


def test_report_targets_from_gpu_rows():
    # Synthetic GPU rows: each target's verdict, and "unmeasured" for what is missing.
    env = dict(device_name="NVIDIA H200", torch="t", triton="tr", commit="c", timestamp="2026-01-01T00:00:00Z")

    def ratio(provider, kernel, dtype, M, N, K, value):
        common = dict(kernel=kernel, provider=provider, mode="forward_backward", dtype=dtype, M=M, N=N, K=K)
        return [make_row(env, **common, metric="time", unit="ms", p50=1.0 / value, p20=1.0 / value, p80=1.0 / value),
                make_row(env, **common, metric="speedup_vs_reference", unit="x", p50=value)]

    rows = []
    kernel = "fa_linear_relu"
    for dtype, M, N, K, auto, triton in (("bf16", 8192, 8192, 8192, 1.07, 0.9), ("fp16", 4096, 4096, 4096, 0.98, 0.8),
                                         ("fp32", 8192, 128, 784, 1.4, 1.2), ("fp32", 8192, 64, 128, 1.25, 1.1)):
        rows += ratio("fa_triton_auto", kernel, dtype, M, N, K, auto)
        rows += ratio("fa_triton", kernel, dtype, M, N, K, triton)
        rows += [make_row(env, kernel=kernel, provider="reference", mode="forward_backward", dtype=dtype, M=M, N=N,
                          K=K, metric="time", unit="ms", p50=1.0, p20=1.0, p80=1.0)]
    sweep_rows = [dict(gpu="NVIDIA H200", target="square", dtype="bf16", M="8192", K="8192", N="8192", job=job,
                       chosen="True", status="ok", x_baseline=str(x), x_tutorial="1.1", config="128x256x64 w8 s3")
                  for job, x in (("forward", 0.97), ("backward_input", 0.93), ("backward_weight", 1.0))]
    text = "\n".join(report.target_lines(rows, sweep_rows))
    assert "targets (NVIDIA H200):" in text
    assert "each 16-bit kernel >= 0.95x cuBLAS of the same shape and layout (bench.sweep --mode chosen): FAIL" in text
    assert "bf16 8192^3: FAIL: forward 0.97x, backward_input 0.93x, backward_weight 1.00x" in text
    assert "bf16 4096^3: unmeasured" in text and "fp16 8192^3: unmeasured" in text
    assert "auto fwd+bwd >= 1.0x reference at every benchmarked shape: FAIL (4 shapes; lowest 0.98x" in text
    assert "auto fwd+bwd >= 1.05x reference at 8192^3 bf16: PASS: 1.07x" in text
    assert ("tutorial layers at batch 8192, auto fwd+bwd >= 1.3x reference: FAIL (partly measured): "
            "784->128 relu fp32 1.40x, 128->64 relu fp32 1.25x, 64->10 identity fp32 unmeasured") in text
    assert "8192x8192 -> 8192 (relu): bf16 0.90x" in text  # Triton-only, reported without a target
    table = report.summary_lines(rows)
    assert table[0].split(" | ")[3:5] == ["auto ms", "triton ms"] and "1.07x" in table[-1] and "0.90x" in table[-1]
    assert report.kernel_lines(sweep_rows)[0].startswith("per kernel (NVIDIA H200")
