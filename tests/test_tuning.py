"""Launch configs (kernels/tuning.py): the typed config, the heuristic, the candidates, the
split plans, the batch buckets and the δ pass's config. The tuner that times them is
tests/test_autotune.py's."""

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
    configs = tuning.candidate_configs(kernel, rows, cols, red, dtype, sms, tma=tma)
    heuristic = tuning.heuristic_config(kernel, rows, cols, red, dtype, sms)
    assert configs[0] == heuristic and not heuristic.tma  # the untuned config never needs TMA
    assert len(configs) == len(set(configs)), "duplicate candidates"
    tiles = {(c.block_rows, c.block_cols, c.block_red, c.num_warps, c.num_stages) for c in configs}
    assert len(tiles) <= tuning.MAX_TILE_CANDIDATES  # each tile is one compile
    assert any(c.tma for c in configs) == (tma and any(c.block_rows >= 64 for c in configs))
    assert all(c.block_rows >= 64 for c in configs if c.tma)  # TMA only where the dot is a wgmma
    assert sum(c.tma for c in configs) <= tuning.MAX_TMA_CANDIDATES
    cap_red = 32 if dtype == torch.float32 else 64
    for c in configs:
        for size, value, cap in ((rows, c.block_rows, 256), (cols, c.block_cols, 256), (red, c.block_red, cap_red)):
            assert value >= 16 and value & (value - 1) == 0 and value <= max(16, _pow2_at_least(size)) and value <= cap
        if kernel == "backward_input" or c.tma and kernel == "forward":
            assert c.split == 1
        splits, per_split = tuning.split_plan(red, c.split, c.block_red)
        if splits > 1:  # fp32 partials stay small and int32-addressable
            assert splits * rows * cols * 4 <= tuning.SPLIT_MAX_BYTES
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


def test_heuristic_under_the_interpreter_is_few_large_programs():
    config = tuning.heuristic_config("forward", 300, 70, 45, torch.float32, 1, True)
    assert (config.block_rows, config.block_cols, config.block_red, config.split) == (64, 64, 64, 1)


def test_cap_split_keeps_every_launch_possible():
    assert tuning.cap_split(8, 1024, 100, 64) == 8
    assert tuning.cap_split(100, 1024, 100, 64) == 16  # slices of at least one block
    assert tuning.cap_split(10**6, 10**8, 10, 16) == 65535  # the grid's second dimension
    assert tuning.cap_split(4, 0, 10, 16) == 1


def test_batch_buckets_and_problem_keys():
    assert tuning.bucket(1) == 16 and tuning.bucket(64) == 64 and tuning.bucket(65) == 128
    problem = tuning.Problem("backward_weight", 512, 784, 700, "red", torch.bfloat16, "tf32", "", False, True)
    assert tuning.problem_key(problem, True) == ("backward_weight", "bfloat16", "tf32", "", False, True, 512, 784, 1024)
    rows = problem._replace(kernel="forward", rows=700, red=512, batch_axis="rows")
    assert tuning.problem_key(rows, False)[-3:] == (1024, 784, 512)


def test_tma_only_where_its_loops_are_clean(as_gpu):
    # IEEE fp32 has no tensor-core dots, and tf32 ones take only K-major operands: of fp32,
    # only the tf32 forward gets TMA candidates; every 16-bit kernel gets them.
    as_gpu(132, tma=True)
    cuda = torch.device("cuda", 0)
    for kernel in ("forward", "backward_input", "backward_weight"):
        half = tuning.Problem(kernel, 4096, 4096, 4096, "rows", torch.bfloat16, "tf32", "", False, True)
        assert tuning.tma_allowed(cuda, half) and not tuning.tma_allowed(cuda, half._replace(tma_layout=False))
        fp32 = half._replace(dtype=torch.float32)
        assert tuning.tma_allowed(cuda, fp32) == (kernel == "forward")
        assert not tuning.tma_allowed(cuda, fp32._replace(precision="ieee"))
    as_gpu(132, tma=False)  # a GPU before Hopper
    assert not tuning.tma_allowed(cuda, tuning.Problem("forward", 64, 64, 64, "rows", torch.float16, "tf32", "",
                                                       False, True))


@pytest.mark.parametrize("rows, cols, sms", [(64, 128, 132), (8192, 8192, 132), (8192, 10, 132), (1, 1, 16),
                                             (100000, 64, 108)])
def test_pass_config_fills_the_gpu_with_whole_blocks(rows, cols, sms):
    config = tuning.pass_config(rows, cols, sms, interpreted=False)
    assert config.block_cols >= min(16, cols) and config.block_cols <= 128
    column_blocks = -(-cols // config.block_cols)
    assert 1 <= config.split <= max(1, -(-rows // config.block_rows))  # no empty row slice
    if rows >= 32 * 4 * sms:
        assert column_blocks * config.split >= 4 * sms or config.split == -(-rows // 32)
    assert tuning.pass_config(rows, cols, sms, interpreted=True).split == 1
