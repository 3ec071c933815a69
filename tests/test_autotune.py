"""The tuner (kernels/autotune.py) and ``backend="auto"`` (fa_triton/ops/backends/auto.py), driven without
a GPU by a fake timer: the fastest candidate wins, failures are skipped, choices are cached on
disk per GPU and versions and reused by a new process, a version change invalidates them, the
cache can be moved or turned off, CUDA-graph capture gets a stand-in, and ``auto`` runs the
reference or the kernels, whichever the timer says is faster."""

import json

import pytest
import torch

from fa_triton.kernels import autotune, tuning
from fa_triton.kernels.tuning import LaunchConfig, Problem
from fa_triton.ops import backends
from fa_triton.ops.autograd import AutoFALinearFunction
from fa_triton.ops.backends import auto as auto_backend
from fa_triton.rules.methods import FA_RULE
from tests.helpers import KERNEL_DEVICE
from tests.oracle import make_inputs

VERSIONS = {"torch": "2.99", "triton": "9.1", "fa_triton": "0.1.0"}


def fake_timer(times: dict):
    """A timer that runs the candidate once (as do_bench would) and returns its listed time."""
    ran = []

    def timer(fn):
        fn()
        ran.append(timer.last)
        return times[timer.last]

    timer.ran = ran
    return timer


def make_tuner(times, directory, versions=VERSIONS):
    timer = fake_timer(times)
    tuner = autotune.Tuner(timer=timer, directory=directory, versions_of=lambda: dict(versions))
    return tuner, timer


def run_recording(timer):
    def run(candidate):
        timer.last = candidate
        if candidate == "broken":
            raise RuntimeError("out of shared memory")
    return run


def test_the_fastest_candidate_wins_and_failures_are_skipped(tmp_path):
    tuner, timer = make_tuner({"a": 2.0, "b": 0.5, "c": 1.0}, tmp_path)
    assert tuner.choose("GPU", ("k",), ["a", "b", "broken", "c"], run_recording(timer)) == ("b", True)
    assert timer.ran == ["a", "b", "c"]
    entry = tuner.entries[("GPU", ("k",))]
    assert entry.source == "measured" and dict(entry.timings)["broken"] == "failed: RuntimeError"
    with pytest.raises(RuntimeError, match="none of 1 candidates ran.*out of shared memory"):
        tuner.choose("GPU", ("other",), ["broken"], run_recording(timer))


def test_choices_are_reused_from_disk_by_a_new_process(tmp_path):
    first, timer = make_tuner({"triton": 1.0, "torch": 2.0}, tmp_path)
    config = LaunchConfig(128, 256, 64, num_warps=8, tma=True)
    first.choose("NVIDIA H200", ("auto", "forward", 64), ["triton", "torch"], run_recording(timer))
    times = {config: 0.1, LaunchConfig(64, 64, 64): 0.2}
    timer_b = fake_timer(times)
    first.timer = timer_b
    first.choose("NVIDIA H200", ("forward", "bfloat16", 8192), list(times), run_recording(timer_b))
    files = list(tmp_path.glob("*.json"))
    assert [f.name for f in files] == ["nvidia-h200_torch-2.99_triton-9.1_fa_triton-0.1.0.json"]
    assert len(json.loads(files[0].read_text())["entries"]) == 2
    # A new process (a new Tuner on the same folder) times nothing and gets the same choices.
    second, timer2 = make_tuner({}, tmp_path)
    run = run_recording(timer2)
    assert second.choose("NVIDIA H200", ("auto", "forward", 64), ["triton", "torch"], run) == ("triton", True)
    assert second.choose("NVIDIA H200", ("forward", "bfloat16", 8192), list(times), run) == (config, True)
    assert timer2.ran == [] and second.entries[("NVIDIA H200", ("auto", "forward", 64))].source == "disk"
    # Another GPU, or another fa_triton, torch or triton version: tuned again.
    other_gpu, timer3 = make_tuner({"triton": 3.0, "torch": 2.0}, tmp_path)
    assert other_gpu.choose("NVIDIA H100", ("auto", "forward", 64), ["triton", "torch"],
                            run_recording(timer3)) == ("torch", True)
    newer, timer4 = make_tuner({"triton": 3.0, "torch": 2.0}, tmp_path, dict(VERSIONS, fa_triton="0.2.0"))
    assert newer.choose("NVIDIA H200", ("auto", "forward", 64), ["triton", "torch"],
                        run_recording(timer4)) == ("torch", True)
    assert timer3.ran == timer4.ran == ["triton", "torch"]


def test_the_cache_folder_is_relocated_or_turned_off_by_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("FA_TRITON_CACHE_DIR", str(tmp_path / "here"))
    assert autotune.cache_dir() == tmp_path / "here"
    tuner = autotune.Tuner(timer=fake_timer({"a": 1.0}), versions_of=lambda: VERSIONS)
    tuner.timer.last = "a"
    tuner.choose("GPU", ("k",), ["a"], run_recording(tuner.timer))
    assert len(list((tmp_path / "here").glob("*.json"))) == 1
    for off in ("0", "off", ""):
        monkeypatch.setenv("FA_TRITON_CACHE_DIR", off)
        assert autotune.cache_dir() is None
    tuner = autotune.Tuner(timer=fake_timer({"a": 1.0}), versions_of=lambda: VERSIONS)
    tuner.choose("GPU", ("k2",), ["a"], run_recording(tuner.timer))  # memory only: no error, no file
    assert tuner.entries[("GPU", ("k2",))].choice == "a"
    monkeypatch.delenv("FA_TRITON_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert autotune.cache_dir() == tmp_path / "xdg" / "fa_triton"


def test_an_unreadable_cache_is_ignored(tmp_path, caplog):
    tuner, timer = make_tuner({"a": 1.0}, tmp_path)
    path = tuner._path("GPU")
    path.write_text("{not json")
    assert tuner.choose("GPU", ("k",), ["a"], run_recording(timer)) == ("a", True)
    assert "unreadable tuning cache" in caplog.text


def test_capture_gets_a_stand_in_that_is_not_remembered(tmp_path, monkeypatch):
    tuner, timer = make_tuner({"triton": 2.0, "torch": 1.0}, tmp_path)
    monkeypatch.setattr(autotune, "capturing", lambda: True)
    assert tuner.choose("GPU", ("k",), ["torch", "triton"], run_recording(timer), stand_in="triton") == (
        "triton", False)
    assert timer.ran == [] and tuner.entries == {}
    monkeypatch.setattr(autotune, "capturing", lambda: False)
    assert tuner.choose("GPU", ("k",), ["torch", "triton"], run_recording(timer)) == ("torch", True)
    monkeypatch.setattr(autotune, "capturing", lambda: True)  # a cached choice is used during capture
    assert tuner.choose("GPU", ("k",), ["torch", "triton"], run_recording(timer)) == ("torch", True)


def test_the_report_lists_choices_and_timings(tmp_path):
    tuner, timer = make_tuner({"triton": 0.25, "torch": 0.5}, tmp_path)
    assert "no choice" in tuner.report()
    tuner.choose("GPU", ("auto", "forward", 64), ["triton", "torch"], run_recording(timer))
    report = tuner.report()
    assert "GPU | auto forward 64 -> triton (measured)" in report
    assert "0.2500 ms" in report and "0.5000 ms" in report


# ------------------------------------------------------------------------- select_config

@pytest.fixture
def as_gpu(monkeypatch, tmp_path):
    """select_config as on a GPU of 132 SMs with TMA (no GPU needed), a fresh tuner on tmp_path."""
    monkeypatch.setattr(tuning, "sm_count", lambda device: 132)
    monkeypatch.setattr(tuning, "tma_supported", lambda device: True)
    monkeypatch.setattr(tuning, "device_name", lambda device: "Fake GPU")
    monkeypatch.setattr(autotune, "AUTOTUNE", True)
    monkeypatch.setattr(autotune, "capturing", lambda: False)
    tuned = []

    def choose(gpu, key, candidates, run, stand_in=None):
        tuned.append((key, candidates))
        return candidates[-1], True

    tuner = autotune.Tuner(directory=tmp_path, versions_of=lambda: VERSIONS)
    monkeypatch.setattr(tuner, "choose", choose)
    monkeypatch.setattr(autotune, "TUNER", tuner)
    return tuned


def _select(kernel, rows, cols, red, batch_axis="rows", dtype=torch.float16, precision="tf32", tma_layout=True,
            device=None):
    device = torch.device("cuda", 0) if device is None else device
    problem = Problem(kernel, rows, cols, red, batch_axis, dtype, precision, "", False, tma_layout)
    return autotune.select_config(problem, device, launch=None)


def test_select_config_tunes_with_the_candidates_and_buckets_the_batch(as_gpu, monkeypatch):
    first, final = _select("forward", 1000, 512, 512)
    key, candidates = as_gpu[0]
    assert final and first == candidates[-1] and first.tma  # the layout and the GPU allow TMA
    assert candidates == tuning.candidate_configs("forward", 1000, 512, 512, torch.float16, 132, True)
    assert key == tuning.problem_key(Problem("forward", 1024, 512, 512, "rows", torch.float16, "tf32", "", False,
                                             True), True)
    _select("backward_weight", 512, 512, 700, "red", tma_layout=False)
    assert not any(c.tma for c in as_gpu[-1][1]) and as_gpu[-1][0][-1] == 1024
    # The heuristic, untimed: launch-bound sizes, off CUDA, tuning switched off.
    heuristic = tuning.heuristic_config("forward", 8, 16, 16, torch.float16, 132)
    assert _select("forward", 8, 16, 16) == (heuristic, True)
    _select("forward", 9000, 512, 512, device=torch.device("cpu"))
    monkeypatch.setattr(autotune, "AUTOTUNE", False)
    _select("forward", 9000, 512, 512)
    assert len(as_gpu) == 2


def test_the_sweeps_table_is_used_without_tuning(as_gpu, monkeypatch):
    measured = LaunchConfig(128, 256, 64, num_warps=8, tma=True)
    problem = Problem("forward", 3000, 4096, 4096, "rows", torch.float16, "tf32", "", False, True)
    key = ("Fake GPU",) + tuning.problem_key(problem, True)
    assert key[-3:] == (4096, 4096, 4096)
    monkeypatch.setattr(autotune, "TABLE", {key: measured})
    assert _select("forward", 3000, 4096, 4096) == (measured, True)  # 3000 rows: bucket 4096
    assert as_gpu == [] and autotune.TUNER.entries[("Fake GPU", key[1:])].source == "table"


# ------------------------------------------------------------------------- backend="auto"

@pytest.fixture
def auto_with(monkeypatch, tmp_path):
    """backend="auto" on CPU tensors (the kernels through the interpreter) with a fake timer
    that makes ``winner`` the faster of "triton" and "torch"."""
    def setup(winner):
        times = {"triton": 1.0, "torch": 2.0} if winner == "triton" else {"triton": 2.0, "torch": 1.0}
        timer = fake_timer(times)
        tuner = autotune.Tuner(timer=timer, directory=tmp_path, versions_of=lambda: VERSIONS)
        monkeypatch.setattr(autotune, "TUNER", tuner)
        backends.clear_auto_choices()
        calls = {"triton": 0, "torch": 0}
        monkeypatch.setattr(auto_backend, "_BY_PUBLIC", dict(auto_backend._BY_PUBLIC))
        for name in ("triton", "torch"):
            spies = {}
            for step in ("forward", "local_error", "backward_input", "backward_weight", "dfa_delta"):
                original = getattr(auto_backend._BY_PUBLIC[name], step)

                def spy(*args, _name=name, _original=original):
                    timer.last = _name
                    calls[_name] += 1
                    return _original(*args)
                spies[step] = spy
            auto_backend._BY_PUBLIC[name] = auto_backend._BY_PUBLIC[name].replace(**spies)
        return tuner, calls

    yield setup
    backends.clear_auto_choices()


@pytest.mark.parametrize("winner", ["torch", "triton"])
def test_auto_runs_the_faster_backend_of_each_step(winner, auto_with):
    tuner, calls = auto_with(winner)
    x, weight, bias, feedback, grad_y = make_inputs((9,), 12, 7, torch.float32, KERNEL_DEVICE, activation="tanh")
    x, weight, bias = (t.clone().requires_grad_(True) for t in (x, weight, bias))
    y = AutoFALinearFunction.apply(x, weight, bias, feedback, None, "tanh", 0.01, FA_RULE)
    y.backward(grad_y)
    steps = {key[1] for _, key in tuner.entries}
    assert steps == {"forward", "local_error", "backward_input", "backward_weight"}
    assert all(entry.choice == winner for entry in tuner.entries.values())
    reference = torch.tanh(x.detach() @ weight.detach().t() + bias.detach())
    torch.testing.assert_close(y.detach(), reference, rtol=1e-5, atol=1e-5)
    assert set(backends.AUTO.forward.chosen.values()) == {auto_backend._BY_PUBLIC[winner]}
    # A second call times nothing: its four steps run on the winner only.
    before = dict(calls)
    y2 = AutoFALinearFunction.apply(x, weight, bias, feedback, None, "tanh", 0.01, FA_RULE)
    y2.backward(grad_y)
    loser = "triton" if winner == "torch" else "torch"
    assert calls[loser] == before[loser] and calls[winner] == before[winner] + 4
    assert len(tuner.entries) == 4


def test_cached_choices_are_reported_by_a_new_process(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FA_TRITON_CACHE_DIR", str(tmp_path))
    first, timer = make_tuner({"triton": 0.5, "torch": 0.25}, tmp_path, autotune.versions())
    first.choose("NVIDIA H200", ("auto", "forward", "bfloat16", 8192), ["triton", "torch"], run_recording(timer))
    other, _ = make_tuner({}, tmp_path, dict(VERSIONS))  # another torch/triton: not these versions' file
    other.remember("NVIDIA H200", ("auto", "local_error"), "triton")
    fresh = autotune.Tuner(directory=tmp_path)
    assert fresh.load_cached() == 1
    assert "NVIDIA H200 | auto forward bfloat16 8192 -> torch (disk)" in fresh.report()
    monkeypatch.setattr(autotune, "TUNER", autotune.Tuner())
    from fa_triton.experiments import cli

    assert cli.main(["tuning-report"]) == 0
    out = capsys.readouterr().out
    assert f"tuning cache: {tmp_path}" in out and "-> torch (disk)" in out and "0.2500 ms" in out
    assert "local_error" not in out


def test_a_cache_written_by_other_code_is_a_miss_and_is_repaired(tmp_path, caplog):
    tuner, timer = make_tuner({"a": 1.0, "b": 2.0}, tmp_path)
    path = tuner._path("GPU")
    key = json.dumps(["k"])
    # A config field this version does not know, a value it does not allow: misses, not crashes.
    bad_field = {"choice": {"config": {"block_rows": 64, "block_cols": 64, "block_red": 32, "persistent": True}}}
    bad_value = {"choice": {"config": {"block_rows": 100, "block_cols": 64, "block_red": 32}}}
    for record in (bad_field, bad_value):
        path.write_text(json.dumps({"gpu": "GPU", "entries": {key: record}}))
        fresh, timer = make_tuner({"a": 1.0, "b": 2.0}, tmp_path)
        assert fresh.choose("GPU", ("k",), ["a", "b"], run_recording(timer)) == ("a", True)
        assert timer.ran == ["a", "b"]
    assert "ignoring the tuning cache's entry" in caplog.text
    # Entries of the wrong shape, a truncated file: ignored, then replaced by a good file.
    for text in ('{"gpu": "GPU", "entries": []}', '{"gpu": "GPU", "entr'):
        path.write_text(text)
        fresh, timer = make_tuner({"a": 1.0, "b": 2.0}, tmp_path)
        assert fresh.choose("GPU", ("k",), ["a", "b"], run_recording(timer)) == ("a", True)
        assert json.loads(path.read_text())["entries"][key]["choice"] == {"name": "a"}


def test_the_cache_file_names_the_kernels_sources(tmp_path, monkeypatch):
    tuner = autotune.Tuner(directory=tmp_path, versions_of=lambda: dict(VERSIONS, kernels="abc123"))
    assert tuner._path("GPU").name.endswith("_fa_triton-0.1.0_kernels-abc123.json")
    assert len(autotune.kernels_hash()) == 12 and autotune.versions()["kernels"] == autotune.kernels_hash()


@pytest.mark.parametrize("winner", ["fused", "stepwise"])
def test_auto_times_the_fused_chain_against_the_chain_step_by_step(winner, monkeypatch, tmp_path,
                                                                   fp32_matmul_precision):
    # A narrow chain on backend="auto" (CPU tensors: the kernels through the interpreter): its
    # forward and backward each run the fused MLP or the chain step by step, whichever the timer
    # says is faster, chosen once per key; either way the chain's numbers are the kernels'.
    from fa_triton.ops.sequential import FASequentialFunction

    fp32_matmul_precision(True)  # the fused MLP takes fp32 with tf32 dots only
    times = {"fused": 1.0, "stepwise": 2.0} if winner == "fused" else {"fused": 2.0, "stepwise": 1.0}

    def timer(fn):  # the fused candidate's spy says when it ran; anything else is the stepwise run
        timer.last = "stepwise"
        fn()
        return times[timer.last]

    tuner = autotune.Tuner(timer=timer, directory=tmp_path, versions_of=lambda: VERSIONS)
    monkeypatch.setattr(autotune, "TUNER", tuner)
    backends.clear_auto_choices()
    monkeypatch.setattr(auto_backend, "_BY_PUBLIC", dict(auto_backend._BY_PUBLIC))
    fused_calls = {"chain_forward": 0, "chain_backward": 0}
    spies = {}
    for step in fused_calls:
        original = getattr(backends.TRITON, step)

        def spy(*args, _step=step, _original=original, **kwargs):
            timer.last = "fused"
            fused_calls[_step] += 1
            return _original(*args, **kwargs)
        spies[step] = spy
    auto_backend._BY_PUBLIC["triton"] = backends.TRITON.replace(**spies)

    gen = torch.Generator().manual_seed(3)
    sizes = [(9, 16, "relu"), (16, 8, "tanh"), (8, 5, "identity")]
    specs = tuple((activation, 0.01, FA_RULE) for _, _, activation in sizes)
    params = []
    for k, n, _ in sizes:
        params += [torch.randn(n, k, generator=gen).requires_grad_(True), torch.randn(n, generator=gen)
                   .requires_grad_(True), torch.randn(n, k, generator=gen), None]
    params = [p if p is None else p.to(KERNEL_DEVICE).detach().requires_grad_(p.requires_grad) for p in params]
    x = torch.randn(6, 9, generator=gen).to(KERNEL_DEVICE).requires_grad_(True)
    grad_y = torch.randn(6, 5, generator=gen).to(KERNEL_DEVICE)

    def step(backend):
        for t in [x, *params]:
            if t is not None:
                t.grad = None
        y = FASequentialFunction.apply(x, backend, specs, *params)
        y.backward(grad_y)
        return [y.detach(), x.grad] + [p.grad for p in params if p is not None and p.requires_grad]

    got = step(backends.AUTO)
    chain_keys = {key[1]: entry.choice for (_, key), entry in tuner.entries.items() if key[1].startswith("chain_")}
    assert chain_keys == {"chain_forward": winner, "chain_backward": winner}
    backward_key = next(key for _, key in tuner.entries if key[1] == "chain_backward")
    assert backward_key[-1] == ("fa", "fa", "fa")  # how B is formed changes both forms' costs
    want = step(backends.TRITON)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    before = dict(fused_calls)
    again = step(backends.AUTO)  # the choices are kept: nothing is timed, the winner runs once per step
    assert fused_calls == {name: count + (winner == "fused") for name, count in before.items()}
    for a, b in zip(again, want):
        torch.testing.assert_close(a, b)
    # Keywords as the other backends take them: out by name, a misspelt one refused by name.
    weights, biases = params[0::4], params[1::4]
    out = torch.empty(6, 5, device=KERNEL_DEVICE)
    with torch.no_grad():
        fused = backends.AUTO.chain_forward(x.detach(), weights, biases, [(a, s) for a, s, _ in specs], out=out,
                                            stepwise=lambda: None)
    assert (fused is not None) == (winner == "fused")  # None: the caller runs the chain layer by layer
    if fused is not None:
        torch.testing.assert_close(out, want[0])
    with pytest.raises(TypeError, match="unexpected keyword argument 'output'"):
        backends.AUTO.chain_forward(x.detach(), weights, biases, [], output=out, stepwise=lambda: None)


@pytest.mark.parametrize("winner", ["torch", "triton"])
def test_a_layers_auto_steps_keep_each_choice_for_its_layout(winner, monkeypatch, tmp_path):
    # FALinear(backend="auto") on CPU tensors, made to resolve to AUTO (the kernels through the
    # interpreter), the timer making ``winner`` faster: once a step has chosen for a layout, a call
    # of that layout builds no auto key, and runs what auto chose (the layer's own plans for the
    # kernels); another layout asks auto again. The numbers are the winner's own, bit for bit.
    import itertools

    from fa_triton import FALinear, fa_linear
    from fa_triton.ops.backends import registry

    times = itertools.cycle((1.0, 2.0) if winner == "triton" else (2.0, 1.0))  # candidates: triton, then torch
    tuner = autotune.Tuner(timer=lambda fn: (fn(), next(times))[1], directory=tmp_path, versions_of=lambda: VERSIONS)
    monkeypatch.setattr(autotune, "TUNER", tuner)
    backends.clear_auto_choices()
    resolve = registry._resolve
    monkeypatch.setattr(registry, "_resolve",
                        lambda backend, *args: "auto" if backend == "auto" else resolve(backend, *args))
    monkeypatch.setattr(registry, "_RESOLVED", {})
    keys_built, launched = [], []
    for step in auto_backend.STEPS:
        monkeypatch.setattr(step, "key_of", lambda *args, _step=step.step, _key_of=step.key_of:
                            keys_built.append(_step) or _key_of(*args))
    from fa_triton import kernels

    def counted(launcher):
        return lambda *args, **kwargs: launched.append(1) or launcher(*args, **kwargs)

    for name in ("fa_linear_forward", "fa_linear_local_error", "fa_linear_backward_input", "fa_linear_backward_weight"):
        monkeypatch.setattr(kernels, name, counted(getattr(kernels, name)))

    torch.manual_seed(0)
    layer = FALinear(12, 7, activation="tanh", backend="auto")

    def step(x, grad_y):
        x = x.detach().requires_grad_()
        layer.weight.grad = layer.bias.grad = None
        y = layer(x)
        y.backward(grad_y)
        return y.detach(), x.grad, layer.weight.grad, layer.bias.grad

    def winners_step(x, grad_y):
        x = x.detach().requires_grad_()
        weight, bias = (t.detach().clone().requires_grad_() for t in (layer.weight, layer.bias))
        y = fa_linear(x, weight, bias, layer.feedback, "tanh", backend=winner)
        y.backward(grad_y)
        return y.detach(), x.grad, weight.grad, bias.grad

    every_step = {"forward", "local_error", "backward_input", "backward_weight"}

    def check(x, grad_y, asked):
        """One step against the winner's own; ``asked``: the steps whose auto key it must build."""
        keys_built.clear()
        launched.clear()
        got = step(x, grad_y)
        built, launches = set(keys_built), len(launched)
        for got_one, want in zip(got, winners_step(x, grad_y)):
            torch.testing.assert_close(got_one, want, rtol=0, atol=0)
        assert built == asked, built
        if not asked:  # the kept choices alone: on the kernels, the layer's own plans (no launcher)
            assert launches == 0, launches

    x, grad_y = torch.randn(9, 12), torch.randn(9, 7)
    monkeypatch.setattr(autotune, "capturing", lambda: True)  # CUDA-graph capture: auto's stand-ins, never kept
    for _ in range(3):
        keys_built.clear()
        step(x, grad_y)
        assert set(keys_built) == every_step  # the layer's steps too ask auto at every call
    assert tuner.entries == {}
    monkeypatch.setattr(autotune, "capturing", lambda: False)
    check(x, grad_y, every_step)  # auto times both, and keeps its choices
    check(x, grad_y, set())  # then the kept choices alone
    assert {entry.choice for entry in tuner.entries.values()} == {winner} and len(tuner.entries) == 4
    check(torch.randn(11, 12), torch.randn(11, 7), every_step)  # another batch: auto is asked (and times it)
    check(torch.randn(11, 12), torch.randn(11, 7), set())
    check(torch.randn(12, 11).t(), torch.randn(11, 7), {"forward", "backward_weight"})  # x transposed
    # grad_y transposed too: δ is the kernels' own (contiguous), or torch's (in grad_y's layout)
    x, grad_y = torch.randn(12, 11).t(), torch.randn(7, 11).t()
    check(x, grad_y, {"local_error"} if winner == "triton" else {"local_error", "backward_input", "backward_weight"})
    layer.feedback.data = layer.feedback.data.t().contiguous().t()  # B's strides (1, 7)
    check(x, grad_y, {"backward_input"})
    check(x, grad_y, set())
    backends.clear_auto_choices()  # reaches the choices the layer kept: it asks auto again
    check(x, grad_y, every_step)
