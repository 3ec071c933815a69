"""Launch configs (kernels/tuning.py): the typed config, the heuristic, the candidates, the
autotuner, the batch buckets, the sweep's table and the CUDA-graph stand-in."""

import pytest
import torch

from fa_triton.kernels import tuning
from fa_triton.kernels.tuning import LaunchConfig


@pytest.fixture
def as_gpu(monkeypatch):
    """Config selection as on a GPU with the given number of SMs (no GPU needed); the
    heuristic's cache is cleared before and after, so no GPU config leaks into other tests."""
    def setup(sms=132, tma=True, name="Fake GPU"):
        monkeypatch.setattr(tuning, "sm_count", lambda device: sms)
        monkeypatch.setattr(tuning, "tma_supported", lambda device: tma)
        monkeypatch.setattr(tuning, "device_name", lambda device: name)
        monkeypatch.setattr(tuning, "AUTOTUNE", True)
        monkeypatch.setattr(tuning, "TUNED", {})
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
        tuning.heuristic_config.cache_clear()

    yield setup
    tuning.heuristic_config.cache_clear()


def test_launch_config_validates_its_fields():
    assert LaunchConfig(64, 32, 16).split == 1 and not LaunchConfig(64, 32, 16).tma
    for bad, match in [(dict(block_rows=48), "block_rows"), (dict(block_cols=8), "block_cols"),
                       (dict(block_red=True), "block_red"), (dict(num_warps=3), "num_warps"),
                       (dict(num_stages=0), "num_stages"), (dict(split=1.5), "split"), (dict(group=0), "group"),
                       (dict(tma=1), "tma")]:
        fields = {**dict(block_rows=64, block_cols=64, block_red=32), **bad}
        with pytest.raises(ValueError, match=match):
            LaunchConfig(**fields)


def test_as_config_takes_dicts_old_and_new():
    config = LaunchConfig(64, 32, 16, num_warps=8, split=2)
    assert tuning.as_config(config) is config
    assert tuning.as_config(dict(block_rows=64, block_cols=32, block_red=16, num_warps=8, split=2)) == config
    assert tuning.as_config(dict(BLOCK_ROWS=64, BLOCK_COLS=32, BLOCK_RED=16, num_warps=8, SPLIT=2)) == config
    with pytest.raises(ValueError, match="block_red"):
        tuning.as_config(dict(block_rows=64, block_cols=32))
    with pytest.raises(ValueError, match="unknown key 'BLOCK_Q'"):
        tuning.as_config(dict(block_rows=64, block_cols=32, block_red=16, BLOCK_Q=2))
    with pytest.raises(TypeError, match="LaunchConfig or a dict"):
        tuning.as_config((64, 32, 16))


def test_split_plan_covers_the_reduction():
    for red in (1, 15, 16, 17, 300, 8192, 10_000):
        for split in (1, 2, 3, 7, 64, 1000):
            for block in (16, 32, 64):
                splits, per_split = tuning.split_plan(red, split, block)
                assert per_split % block == 0 and 1 <= splits <= split
                assert (splits - 1) * per_split < red <= splits * per_split  # every element once, no empty slice


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@pytest.mark.parametrize("sms", [132, 108, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tma", [False, True])
@pytest.mark.parametrize(
    "kernel, rows, cols, red",
    [("forward", 8192, 8192, 8192), ("forward", 64, 128, 784), ("backward_input", 8192, 784, 128),
     ("backward_weight", 128, 784, 8192), ("backward_weight", 10, 64, 8192), ("backward_weight", 64, 128, 64),
     ("backward_weight", 1, 1, 1), ("backward_input", 64, 784, 128)],
)
def test_candidate_configs(kernel, rows, cols, red, tma, dtype, sms, as_gpu):
    as_gpu(sms)
    configs = tuning.candidate_configs(kernel, rows, cols, red, dtype, sms, bias_grad=True, tma=tma)
    heuristic = tuning.heuristic_config(kernel, rows, cols, red, dtype, sms, True)
    assert configs[0] == heuristic and not heuristic.tma  # the untuned config never needs TMA
    assert len(configs) == len(set(configs)), "duplicate candidates"
    tiles = {(c.block_rows, c.block_cols, c.block_red, c.num_warps, c.num_stages) for c in configs}
    assert len(tiles) <= tuning.MAX_TILE_CANDIDATES  # each tile is one compile
    assert any(c.tma for c in configs) == tma
    assert sum(c.tma for c in configs) <= tuning.MAX_TMA_CANDIDATES
    cap_red = 32 if dtype == torch.float32 else 64
    for c in configs:
        for size, value, cap in ((rows, c.block_rows, 256), (cols, c.block_cols, 256), (red, c.block_red, cap_red)):
            assert value >= 16 and value & (value - 1) == 0 and value <= max(16, _pow2_at_least(size)) and value <= cap
        if kernel == "backward_input" or c.tma and kernel == "forward":
            assert c.split == 1
        splits, per_split = tuning.split_plan(red, c.split, c.block_red)
        if splits > 1:  # fp32 partials stay small and int32-addressable
            assert splits * tuning.split_outputs(kernel, rows, cols, True) * 4 <= tuning.SPLIT_MAX_BYTES
            assert per_split >= tuning.SPLIT_MIN_STEPS * c.block_red
    if (rows, cols, red) == (8192, 8192, 8192):  # two waves of 128x128 tiles: no small tiles
        assert all(c.block_rows * c.block_cols >= 128 * 128 for c in configs)
    if kernel == "backward_weight" and red == 8192 and sms >= 108:
        # A small layer over a long batch: the GPU is filled by splitting the batch.
        assert heuristic.split > 1 and any(c.split > 1 for c in configs[1:])
    if kernel == "backward_weight" and red <= 64:
        assert all(c.split == 1 for c in configs)  # a short batch is never split
    if (kernel, rows, cols, red) == ("forward", 64, 128, 784) and sms >= 108:
        # Batch 64: few output tiles and a long K; split-K variants are among the candidates.
        assert any(c.split > 1 for c in configs)
        assert heuristic.split > 1 if dtype == torch.float32 else True


def test_autotune_picks_the_fastest_and_skips_failures():
    configs = [LaunchConfig(16 * 2**i, 16, 16) for i in range(4)]
    launched = []

    def launch(config):
        launched.append(configs.index(config))
        if launched[-1] == 3:
            raise RuntimeError("out of shared memory")

    def timer(fn):
        fn()
        return {0: 2.0, 1: 0.5, 2: 1.0}[launched[-1]]

    assert tuning.autotune(configs, launch, timer=timer) == configs[1]
    assert launched == [0, 1, 2, 3]
    with pytest.raises(RuntimeError, match="none of 1 configs ran.*out of shared memory"):
        tuning.autotune([configs[3]], launch, timer=timer)


def _select(kernel, rows, cols, red, batch_axis, bias_grad=False, *, dtype=torch.float16, tma_layout=True,
            interpreted=False, activation="relu"):
    return tuning.select_config(kernel, rows, cols, red, batch_axis, dtype=dtype, device=torch.device("cuda", 0),
                                precision="tf32", activation=activation, bias_grad=bias_grad, store=False,
                                tma_layout=tma_layout, interpreted=interpreted, launch=None)


def test_autotune_key_buckets_the_batch(as_gpu, monkeypatch):
    # As on a GPU: the first call of a (shape, bucket) tunes, later calls in the bucket reuse it.
    as_gpu(132)
    tuned = []

    def fake_autotune(configs, launch):
        tuned.append(configs)
        return configs[-1]

    monkeypatch.setattr(tuning, "autotune", fake_autotune)
    first, final = _select("forward", 1000, 512, 512, "rows")
    assert final and first.tma  # the last candidate is a TMA one: the layout and the GPU allow it
    assert _select("forward", 600, 512, 512, "rows") == (first, True)  # same bucket 1024
    assert len(tuned) == 1
    _select("forward", 1500, 512, 512, "rows")  # bucket 2048
    _select("backward_weight", 512, 512, 700, "red", True)  # batch 700 -> 1024
    _select("backward_weight", 512, 512, 1000, "red", True)
    assert len(tuned) == 3
    _select("backward_weight", 512, 512, 1000, "red", True, tma_layout=False)  # another layout class
    assert len(tuned) == 4 and not any(c.tma for c in tuned[-1])
    _select("backward_weight", 512, 512, 1000, "red", True, activation="identity")  # another prologue
    assert len(tuned) == 5
    # Launch-bound sizes, the interpreter and tuning switched off take the heuristic config, untuned.
    small, _ = _select("forward", 8, 16, 16, "rows")
    assert small == tuning.heuristic_config("forward", 8, 16, 16, torch.float16, 132, False)
    _select("forward", 9000, 512, 512, "rows", interpreted=True)
    monkeypatch.setattr(tuning, "AUTOTUNE", False)
    _select("forward", 9000, 512, 512, "rows")
    assert len(tuned) == 5
    assert tuning.bucket(1) == 16 and tuning.bucket(64) == 64 and tuning.bucket(65) == 128


def test_capture_gets_a_stand_in_that_is_not_remembered(as_gpu, monkeypatch):
    # Tuning cannot run inside CUDA-graph capture: the heuristic stands in, marked not final.
    as_gpu(132)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    monkeypatch.setattr(tuning, "autotune", lambda configs, launch: pytest.fail("tuned during capture"))
    config, final = _select("forward", 4096, 4096, 4096, "rows")
    assert not final and config == tuning.heuristic_config("forward", 4096, 4096, 4096, torch.float16, 132, False)
    assert tuning.TUNED == {}


def test_the_sweeps_table_is_used_without_tuning(as_gpu, monkeypatch):
    as_gpu(132, name="Fake GPU")
    measured = LaunchConfig(128, 256, 64, num_warps=8, tma=True)
    key = ("Fake GPU",) + tuning.problem_key("forward", 3000, 4096, 4096, "rows", dtype=torch.float16, precision="tf32",
                                             activation="relu", bias_grad=False, store=False, tma=True)
    assert key[-3:] == (4096, 4096, 4096)
    monkeypatch.setattr(tuning, "TABLE", {key: measured})
    monkeypatch.setattr(tuning, "autotune", lambda configs, launch: pytest.fail("tuned a key the table has"))
    assert _select("forward", 3000, 4096, 4096, "rows") == (measured, True)  # 3000 rows: bucket 4096


def test_heuristic_under_the_interpreter_is_few_large_programs():
    config = tuning.heuristic_config("forward", 300, 70, 45, torch.float32, 1, False, True)
    assert (config.block_rows, config.block_cols, config.block_red, config.split) == (64, 64, 64, 1)


def test_no_tma_candidates_for_ieee_fp32(as_gpu, monkeypatch):
    as_gpu(132, tma=True)
    tuned = []
    monkeypatch.setattr(tuning, "autotune", lambda configs, launch: tuned.append(configs) or configs[0])
    for precision in ("ieee", "tf32"):
        tuning.select_config("forward", 4096, 4096, 4096, "rows", dtype=torch.float32, device=torch.device("cuda", 0),
                             precision=precision, activation="relu", bias_grad=False, store=False, tma_layout=True,
                             interpreted=False, launch=None)
    assert [any(c.tma for c in configs) for configs in tuned] == [False, True]


def test_cap_split_keeps_every_launch_possible():
    assert tuning.cap_split(8, 1024, 100, 64) == 8
    assert tuning.cap_split(100, 1024, 100, 64) == 16  # slices of at least one block
    assert tuning.cap_split(10**6, 10**8, 10, 16) == 65535  # the grid's second dimension
    assert tuning.cap_split(4, 0, 10, 16) == 1
