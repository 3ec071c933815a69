"""Launch configurations of fa_triton's kernels: the typed config, the tile tables, the
heuristic and the autotuning candidates, and the device facts they depend on. Kept apart from
the kernels (``linear_kernels.py``), the launchers (``launchers.py``) and the tuner that times
candidates (``autotune.py``).

The GEMM kernels map onto one config: an output tile of ``block_rows`` × ``block_cols`` and a
reduction step of ``block_red``:

=============== ======================= ========================= ==================
kernel          rows × cols (output)    reduction                 split reduces over
=============== ======================= ========================= ==================
forward         M × N (y)               K (in_features)           K
backward_input  M × K (grad_x)          N (out_features)          —
backward_weight N × K (grad_W)          M (batch)                 M
dfa             M × N (δ)               n_out (the outputs)       —
=============== ======================= ========================= ==================

The δ pass (``pass_kernels.local_error_kernel``) takes block_rows × block_cols tiles and
``split`` row slices (:func:`pass_config`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import torch
import triton

KERNELS = ("forward", "backward_input", "backward_weight", "dfa")
_INT32_MAX = 2**31 - 1
MAX_TILE_CANDIDATES = 6
# Tensor-descriptor (TMA) variants are tried for this many of the largest candidate tiles.
MAX_TMA_CANDIDATES = 3
# Split partials are fp32 [SPLIT, outputs]; cap their size (and keep offsets in int32).
SPLIT_MAX_BYTES = 64 << 20
# Each split must run at least this many reduction steps when chosen automatically.
SPLIT_MIN_STEPS = 4
# The heuristic splits the forward's K only when one program would otherwise run this many steps.
FORWARD_SPLIT_MIN_TOTAL_STEPS = 16


def _is_power_of_two(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0 and value & (value - 1) == 0


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """Block sizes and launch options of one kernel launch (see the module docstring for how
    rows, cols and red map onto each kernel).

    ``split``: slices of the reduction summed by separate programs, then added in order by one
    more kernel (forward and backward_weight; 1 = no split). ``tma``: use the tensor-descriptor
    kernel (Hopper and newer, operands with 16-byte aligned rows and unit last stride; the
    launcher falls back to the pointer kernel for others).
    """

    block_rows: int
    block_cols: int
    block_red: int
    num_warps: int = 4
    num_stages: int = 3
    group: int = 8
    split: int = 1
    tma: bool = False

    def __post_init__(self):
        for name in ("block_rows", "block_cols", "block_red"):
            value = getattr(self, name)
            if not _is_power_of_two(value) or value < 16:
                raise ValueError(f"LaunchConfig.{name} must be a power of two >= 16 (tl.dot's minimum), got {value!r}")
        if not _is_power_of_two(self.num_warps) or self.num_warps > 32:
            raise ValueError(f"LaunchConfig.num_warps must be a power of two <= 32, got {self.num_warps!r}")
        for name in ("num_stages", "group", "split"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LaunchConfig.{name} must be an int >= 1, got {value!r}")
        if not isinstance(self.tma, bool):
            raise ValueError(f"LaunchConfig.tma must be a bool, got {self.tma!r}")

    def replace(self, **changes) -> "LaunchConfig":
        return dataclasses.replace(self, **changes)


# The keys of the dict configs that earlier versions took (and tests and scripts may still pass).
_LEGACY_KEYS = {"BLOCK_ROWS": "block_rows", "BLOCK_COLS": "block_cols", "BLOCK_RED": "block_red",
                "GROUP": "group", "SPLIT": "split", "num_warps": "num_warps", "num_stages": "num_stages",
                "TMA": "tma"}


def as_config(config) -> LaunchConfig:
    """A LaunchConfig from a LaunchConfig or a dict (LaunchConfig's field names, or the older
    upper-case keys BLOCK_ROWS, BLOCK_COLS, BLOCK_RED, GROUP, SPLIT); ValueError names what is wrong."""
    if isinstance(config, LaunchConfig):
        return config
    if not isinstance(config, dict):
        raise TypeError(f"config must be a LaunchConfig or a dict, got {type(config).__name__}")
    fields = {f.name for f in dataclasses.fields(LaunchConfig)}
    values = {}
    for key, value in config.items():
        name = key if key in fields else _LEGACY_KEYS.get(key)
        if name is None:
            raise ValueError(f"config has an unknown key {key!r}; LaunchConfig's fields are {sorted(fields)}")
        values[name] = value
    missing = {"block_rows", "block_cols", "block_red"} - set(values)
    if missing:
        raise ValueError(f"config must give {sorted(missing)}, got keys {sorted(config)}")
    return LaunchConfig(**values)


# (block_rows, block_cols, block_red, num_warps, num_stages), largest tiles first. Operand
# buffers of the biggest: 144 KiB (16-bit) and 96 KiB (fp32); configs a GPU cannot hold are
# skipped by the tuner.
TILES_HALF = (
    (128, 256, 64, 8, 3),
    (256, 128, 64, 8, 3),
    (128, 128, 64, 8, 4),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (64, 64, 64, 4, 4),
    (32, 64, 64, 4, 4),
)
TILES_FP32 = (
    (128, 128, 32, 8, 3),
    (128, 64, 32, 8, 4),
    (64, 128, 32, 4, 4),
    (64, 64, 32, 4, 4),
    (32, 64, 32, 4, 4),
    (32, 32, 32, 4, 4),
)


def block(size: int, cap: int) -> int:
    """The power of two covering ``size``, between 16 (tl.dot's minimum) and ``cap``."""
    return max(16, min(cap, triton.next_power_of_2(size)))


def max_split(red: int, outputs: int, block_red: int, min_steps: int) -> int:
    """Most reduction slices allowed: each at least ``min_steps`` blocks long, fp32 partials
    [split, outputs] under SPLIT_MAX_BYTES and int32-addressable."""
    by_steps = max(1, triton.cdiv(red, block_red) // min_steps)
    by_bytes = max(1, SPLIT_MAX_BYTES // (4 * max(1, outputs)))
    by_offsets = max(1, _INT32_MAX // max(1, outputs))
    return min(by_steps, by_bytes, by_offsets)


def cap_split(split: int, red: int, outputs: int, block_red: int) -> int:
    """``split`` limited to what any launch can take: slices of at least one reduction block,
    fp32 partials within SPLIT_MAX_BYTES and int32 offsets, and a grid's second dimension (65535)."""
    return max(1, min(split, max_split(red, outputs, block_red, 1), 65535))


def split_plan(red: int, split: int, block_red: int) -> tuple[int, int]:
    """(slices actually used, reduction length per slice): the length is a multiple of
    block_red and no slice is empty, so fewer than ``split`` slices may result (one for an
    empty reduction)."""
    per_split = max(block_red, triton.cdiv(triton.cdiv(red, max(1, split)), block_red) * block_red)
    return max(1, triton.cdiv(red, per_split)), per_split


@functools.lru_cache(maxsize=4096)
def heuristic_config(kernel: str, rows: int, cols: int, red: int, dtype: torch.dtype, sms: int,
                     interpreted: bool = False) -> LaunchConfig:
    """The config used without tuning (and the first autotuning candidate). Never TMA: a
    heuristic config must run wherever the pointer kernel runs."""
    if interpreted:
        # Fewer, larger programs: the interpreter's cost is per program and per loop step.
        return LaunchConfig(block(rows, 64), block(cols, 64), block(red, 64), 4, 1)
    block_red = block(red, 32 if dtype == torch.float32 else 64)
    block_rows, block_cols = block(rows, 128), block(cols, 128)
    splittable = kernel in ("forward", "backward_weight")
    # Small outputs: smaller tiles, so that more SMs get work. A long reduction keeps 64x64
    # tiles (backward_weight) and fills the GPU by splitting instead.
    long_red = kernel == "backward_weight" and red >= 2 * SPLIT_MIN_STEPS * block_red
    min_area = 64 * 64 if long_red else 32 * 32
    while triton.cdiv(rows, block_rows) * triton.cdiv(cols, block_cols) < sms and block_rows * block_cols > min_area:
        if block_rows >= block_cols and block_rows > 16:
            block_rows //= 2
        elif block_cols > 16:
            block_cols //= 2
        else:
            break
    # 8 warps from 128x128 up; and on a 128x64 fp32 tile, where 4 warps spill (backward_input,
    # Triton 3.6, sm_90). A 64x128 fp32 tile spills with 8 warps: it keeps 4.
    wide_fp32 = dtype == torch.float32 and block_rows >= 128 and block_cols >= 64
    num_warps = 8 if block_rows * block_cols >= 128 * 128 or wide_fp32 else 4
    split = 1
    tiles = triton.cdiv(rows, block_rows) * triton.cdiv(cols, block_cols)
    steps = triton.cdiv(red, block_red)
    long_forward = kernel == "forward" and steps >= FORWARD_SPLIT_MIN_TOTAL_STEPS
    if splittable and 2 * tiles <= sms and (long_red or long_forward):
        split = min(triton.cdiv(sms, tiles), max_split(red, rows * cols, block_red, SPLIT_MIN_STEPS))
    return LaunchConfig(block_rows, block_cols, block_red, num_warps, 3, split=split)


def candidate_configs(kernel: str, rows: int, cols: int, red: int, dtype: torch.dtype, sms: int,
                      tma: bool = False) -> list[LaunchConfig]:
    """Autotuning candidates for one problem: the heuristic config, then the tile table clamped
    to the problem (duplicates dropped); split variants where the output has few tiles; and,
    when ``tma`` (the GPU and the operands' layout allow it), tensor-descriptor variants of the
    largest tiles."""
    heuristic = heuristic_config(kernel, rows, cols, red, dtype, sms)
    table = TILES_FP32 if dtype == torch.float32 else TILES_HALF
    # When 128x128 tiles already give two waves, smaller tiles only lose operand reuse.
    many_tiles = triton.cdiv(rows, 128) * triton.cdiv(cols, 128) >= 2 * sms
    tiles = [(heuristic.block_rows, heuristic.block_cols, heuristic.block_red, heuristic.num_warps,
              heuristic.num_stages)]
    for block_rows, block_cols, block_red, num_warps, num_stages in table:
        tile = (block(rows, block_rows), block(cols, block_cols), block(red, block_red), num_warps, num_stages)
        if tile[:3] != (block_rows, block_cols, block_red) and tile[0] * tile[1] < 128 * 128:
            # A table tile clamped to a small problem gets 4 warps (8 warps on a 64x128x32 fp32
            # tile spill, sm_90); a table tile used as it is keeps its own.
            tile = tile[:3] + (min(num_warps, 4),) + tile[4:]
        if many_tiles and tile[0] * tile[1] < 128 * 128:
            continue
        if tile not in tiles:
            tiles.append(tile)
    tiles = tiles[:MAX_TILE_CANDIDATES]

    configs = [heuristic]
    splittable = kernel in ("forward", "backward_weight")
    outputs = rows * cols
    for tile in tiles:
        splits = {1}
        n_tiles = triton.cdiv(rows, tile[0]) * triton.cdiv(cols, tile[1])
        if splittable and n_tiles < sms:
            most = max_split(red, outputs, tile[2], SPLIT_MIN_STEPS)
            splits |= {min(most, triton.cdiv(waves * sms, n_tiles)) for waves in (1, 2, 4)}
        for split in sorted(splits):
            config = LaunchConfig(*tile, split=split)
            if config not in configs:
                configs.append(config)
    if tma:
        # Forward's TMA kernel has no split; the largest tiles are where TMA can pay. Tiles under
        # 64 rows get no TMA variant: their dot is not a wgmma (it needs 64-row tiles) and the
        # backward-weight kernel's transposed δ tile would then go through registers.
        wgmma_tiles = [t for t in tiles if t[0] >= 64]
        for tile in sorted(wgmma_tiles, key=lambda t: -t[0] * t[1])[:MAX_TMA_CANDIDATES]:
            config = LaunchConfig(*tile, tma=True)
            if config not in configs:
                configs.append(config)
    return configs


def bucket(batch: int) -> int:
    """The batch size's tuning bucket: the next power of two (at least 16), so that batches of
    100 and 120 rows share one tuned config instead of tuning twice."""
    return max(16, triton.next_power_of_2(batch))


@functools.lru_cache(maxsize=None)
def _device_facts(device_index: int) -> tuple[int, tuple[int, int], str]:
    props = torch.cuda.get_device_properties(device_index)
    return props.multi_processor_count, (props.major, props.minor), props.name


def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return _device_facts(device.index if device.index is not None else torch.cuda.current_device())[0]


def device_name(device: torch.device) -> str:
    if device.type != "cuda":
        return device.type
    return _device_facts(device.index if device.index is not None else torch.cuda.current_device())[2]


def tma_supported(device: torch.device) -> bool:
    """Whether tensor-descriptor kernels can run on ``device``: a Hopper-or-newer GPU and a
    Triton with host tensor descriptors."""
    if device.type != "cuda":
        return False
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except ImportError:
        return False
    return _device_facts(device.index if device.index is not None else torch.cuda.current_device())[1][0] >= 9


def tma_fits(problem: "Problem") -> bool:
    """Whether the tensor-descriptor kernels' loops are clean for ``problem`` (any GPU that has
    TMA): the operands' layout allows descriptors, and for fp32 only the forward with tf32 dots.
    (IEEE fp32 dots are not tensor-core MMAs: the TMA forward spills its transposed operand to
    local memory; tf32 MMAs take only K-major operands, which the backward GEMMs' tiles are
    not, so their TMA loops would transpose through shared memory at every step. The pointer
    kernels are clean.)"""
    if not problem.tma_layout:
        return False
    return problem.dtype != torch.float32 or (problem.precision == "tf32" and problem.kernel == "forward")


def tma_allowed(device: torch.device, problem: "Problem") -> bool:
    """Whether tuning may try the tensor-descriptor kernels for ``problem`` on ``device``: a GPU
    with TMA and :func:`tma_fits`."""
    return tma_fits(problem) and tma_supported(device)


class Problem(NamedTuple):
    """One tuning problem: what a config is chosen for. ``rows × cols`` output tiles reduce over
    ``red`` (see the module docstring); ``batch_axis`` names which of them is the batch ("rows" or
    "red"); ``tag``: what else changes the kernel's cost (the forward's and DFA's activation);
    ``store``: the forward stores its extra tensor; ``tma_layout``: the operands allow the
    tensor-descriptor kernels."""

    kernel: str
    rows: int
    cols: int
    red: int
    batch_axis: str
    dtype: torch.dtype
    precision: str
    tag: str
    store: bool
    tma_layout: bool


def problem_key(problem: Problem, tma: bool) -> tuple:
    """What a tuned config is remembered by: the kernel, dtype name, dot precision, tag, store
    flag, whether TMA kernels may run, and the sizes with the batch bucketed. The sweep's table
    uses the same key, after the GPU's name."""
    dims = {"rows": problem.rows, "cols": problem.cols, "red": problem.red}
    dims[problem.batch_axis] = bucket(dims[problem.batch_axis])
    return (problem.kernel, str(problem.dtype).removeprefix("torch."), problem.precision, problem.tag, problem.store,
            tma, dims["rows"], dims["cols"], dims["red"])


def pass_config(rows: int, cols: int, sms: int, interpreted: bool) -> LaunchConfig:
    """The δ pass's tile (block_rows × block_cols) and row slices (``split``): column blocks
    of up to 128 elements, slices enough for about four programs per SM (the grad_b partials
    of several slices are then added in order). block_red is not used."""
    if interpreted:
        return LaunchConfig(64, block(cols, 64), 16, split=1)
    block_cols = block(cols, 128)
    column_blocks = triton.cdiv(cols, block_cols)
    split = max(1, min(triton.cdiv(4 * sms, column_blocks), triton.cdiv(rows, 32)))
    # 8 warps: 32x128 tiles over 4 warps spill a few bytes for sigmoid and gelu (sm_90, sm_80).
    return LaunchConfig(32, block_cols, 16, num_warps=8, split=split)


#: The fused narrow MLP (``mlp_kernels.py``): the widest layer it takes (one column block on chip,
#: each later layer's whole Wᵀ one dot operand), and how many layers.
MLP_MAX_WIDTH = 128
MLP_MAX_LAYERS = 4


def mlp_config(rows: int, red: int, widest: int, dtype: torch.dtype, interpreted: bool) -> LaunchConfig:
    """The fused MLP's row block (block_rows), first-layer K step (block_red) and warps; block_cols
    is the widest layer's block. Not tuned on a GPU yet (none measured it): row blocks of 32 at
    a batch up to 4096, so that a tutorial batch of 64 still spreads over two programs, else 64
    in 16-bit dtypes (tf32 keeps 32: four 128-wide layers at 64 rows spill 448 bytes on sm_80);
    8 warps once a layer is 128 wide (its fp32 accumulator is 16K values)."""
    block_cols = block(widest, MLP_MAX_WIDTH)
    if interpreted:
        return LaunchConfig(16, block_cols, block(red, 64), num_warps=4, num_stages=1)
    block_rows = 32 if rows <= 4096 or dtype.itemsize == 4 else 64
    block_red = 64 if dtype.itemsize == 2 else 32
    return LaunchConfig(block_rows, block_cols, block(red, block_red), num_warps=8 if block_cols >= 128 else 4,
                        num_stages=3)


#: The fused MLP's weight gradients come from one grouped launch up to this batch; above it each
#: layer's own backward-weight GEMM runs (it splits the batch over more programs: the grouped
#: launch has one program per output tile, 28 for the tutorial's layers). Not measured on a GPU.
MLP_GROUPED_MAX_ROWS = 1024


def mlp_weight_config(dtype: torch.dtype, interpreted: bool) -> LaunchConfig:
    """The grouped weight-gradient launch's tile: block_rows × block_cols of grad_W (N × K) and
    block_red batch rows per step. Untuned (no GPU has timed it)."""
    if interpreted:
        return LaunchConfig(32, 64, 32, num_stages=1)
    return LaunchConfig(64, 64, 64 if dtype.itemsize == 2 else 32, num_warps=4, num_stages=3)
