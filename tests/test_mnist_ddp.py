"""Data-parallel MNIST training on 2 CPU processes (gloo): rank 0's feedback everywhere, identical weights.

Every test bounds its wall time (process timeouts, then the process group is killed), so a
stuck collective cannot hang CI.
"""

import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from fa_triton import FALinear
from fa_triton.experiments.mnist import MNIST_FILES, build_model, train

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TIMEOUT_S = 300
SUBSET = {"train_samples": 384, "test_samples": 256}

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available in this build")


def require_mnist() -> Path:
    if not all((DATA_DIR / "MNIST" / "raw" / name).is_file() for name in MNIST_FILES):
        pytest.skip(f"MNIST files not found under {DATA_DIR / 'MNIST' / 'raw'} (the ../shared/data folder)")
    return DATA_DIR


def _family_model():
    # brsf draws R from a seed and a counter, kp trains B, usf forms B from W: all must agree across ranks.
    return torch.nn.Sequential(FALinear(784, 128, method="brsf"), FALinear(128, 64, method="kp"),
                               FALinear(64, 10, activation="identity", method="usf"))


def _worker(rank: int, world_size: int, store: str, out_dir: str, data_dir: str, family: bool = False) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=120))
    try:
        torch.manual_seed(100 + rank)  # each rank draws different weights and feedback: rank 0's must win
        model = _family_model() if family else build_model()
        drawn_feedback = [layer.feedback.clone() if layer.feedback is not None else layer.feedback_seed.clone()
                          for layer in model[:2]] if family else [layer.feedback.clone() for layer in model]
        df = train(epochs=2, seed=0, device="cpu", data_dir=data_dir, download=False, progress=False,
                   model=model, **SUBSET)
        torch.save({"state": model.state_dict(), "drawn_feedback": drawn_feedback,
                    "table": df.drop(columns="seconds")}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _train_two_processes(tmp_path: Path, data_dir: Path, family: bool = False) -> list[dict]:
    """Run ``_worker`` on ranks 0 and 1 (spawned, bounded by TIMEOUT_S); return what each saved."""
    import torch.multiprocessing as mp

    context = mp.start_processes(_worker, args=(2, str(tmp_path / "store"), str(tmp_path), str(data_dir), family),
                                 nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not context.join(timeout=5):  # raises if a worker failed
            if time.monotonic() > deadline:
                pytest.fail(f"2-process training did not finish in {TIMEOUT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_two_processes_end_with_identical_weights(tmp_path):
    data_dir = require_mnist()
    ranks = _train_two_processes(tmp_path, data_dir)
    state0, state1 = ranks[0]["state"], ranks[1]["state"]
    for key in state0:
        assert torch.equal(state0[key], state1[key]), key
    # The feedback matrices are rank 0's draw, not rank 1's.
    for i, layer_feedback in enumerate(ranks[0]["drawn_feedback"]):
        assert torch.equal(state1[f"{i}.feedback"], layer_feedback)
        assert not torch.equal(state1[f"{i}.feedback"], ranks[1]["drawn_feedback"][i])
    assert ranks[0]["table"].equals(ranks[1]["table"])

    # Each global batch of 64 is split 32 + 32 and DDP averages the gradients: the same training
    # as one process on the whole batches, up to rounding.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(100)
        single = build_model()
        single_table = train(epochs=2, seed=0, device="cpu", data_dir=data_dir, download=False, progress=False,
                             model=single, **SUBSET).drop(columns="seconds")
    finally:
        torch.set_num_threads(threads)
    for key, value in single.state_dict().items():
        torch.testing.assert_close(state0[key], value, atol=1e-5, rtol=1e-4, msg=key)
    torch.testing.assert_close(torch.tensor(ranks[0]["table"].to_numpy()), torch.tensor(single_table.to_numpy()),
                               atol=1e-4, rtol=1e-4)


def test_two_processes_with_the_fa_family(tmp_path):
    # brsf's seed and draw counter, kp's trainable B and usf's sign feedback: rank 0's everywhere,
    # identical after training (train() itself checks every parameter and buffer across ranks).
    data_dir = require_mnist()
    ranks = _train_two_processes(tmp_path, data_dir, family=True)
    state0, state1 = ranks[0]["state"], ranks[1]["state"]
    assert set(state0) >= {"0.feedback_seed", "0.counter", "1.feedback"}
    for key in state0:
        assert torch.equal(state0[key], state1[key]), key
    assert torch.equal(state1["0.feedback_seed"], ranks[0]["drawn_feedback"][0])  # rank 0's seed
    assert int(state0["0.counter"]) == 2 * (SUBSET["train_samples"] // 64)  # one draw per training step
    assert ranks[0]["table"].equals(ranks[1]["table"])


def _run_bounded(command: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    # A new session, so that on timeout torchrun's workers are killed along with it.
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail(f"{' '.join(command)} did not finish in {TIMEOUT_S} s")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def test_cli_nproc_2_runs_torchrun(tmp_path):
    import pandas as pd

    data_dir = require_mnist()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    command = [sys.executable, "-m", "fa_triton", "train", "--nproc", "2", "--device", "cpu", "--epochs", "1",
               "--data-dir", str(data_dir), "--no-download", "--no-progress", "--out", str(tmp_path / "run"),
               "--train-samples", str(SUBSET["train_samples"]), "--test-samples", str(SUBSET["test_samples"])]
    result = _run_bounded(command, tmp_path, env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("wrote ") == 1  # only rank 0 prints and writes
    df = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert list(df["epoch"]) == [1]
    assert (tmp_path / "run" / "training.png").stat().st_size > 10_000
