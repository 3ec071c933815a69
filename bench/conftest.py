"""pytest setup for bench/: the benchmark suite doubles as a smoke test in CI.

- The CPU/CUDA setup (TRITON_INTERPRET=1 without a GPU, the ``cuda`` marker's skip) is the
  repository's root conftest.py, shared with tests/.
- Benchmarking is off unless asked for (``--benchmark-only`` or ``--benchmark-enable``): a plain
  ``pytest`` runs every benchmark body once, at ``--bench-size smoke``.
- ``--bench-size`` picks the shapes: smoke (tiny, CI), cpu (the tutorial's sizes on a CPU), full
  (the issue's GPU sizes); default smoke when benchmarking is off, else full on a GPU, cpu otherwise.
- Without pytest-benchmark installed, a stand-in ``benchmark`` fixture calls the function once.
"""

import pytest

from tests.helpers import HAS_CUDA

try:
    import pytest_benchmark  # noqa: F401

    HAS_PYTEST_BENCHMARK = True
except ImportError:
    HAS_PYTEST_BENCHMARK = False


def pytest_addoption(parser):
    parser.addoption("--bench-size", choices=("smoke", "cpu", "full"), default=None,
                     help="shapes of the bench/ benchmarks (default: smoke unless benchmarking is enabled)")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    option = config.option
    # Runs before pytest-benchmark's own (trylast) configure reads the options.
    if hasattr(option, "benchmark_disable") and not (option.benchmark_only or option.benchmark_enable):
        option.benchmark_disable = True


def bench_size(config) -> str:
    size = config.getoption("--bench-size")
    if size:
        return size
    option = config.option
    enabled = HAS_PYTEST_BENCHMARK and not getattr(option, "benchmark_disable", True)
    if not enabled:
        return "smoke"
    return "full" if HAS_CUDA else "cpu"


if not HAS_PYTEST_BENCHMARK:
    class _CallOnce:
        """The subset of pytest-benchmark's fixture used here, running the function once."""

        def __init__(self):
            self.extra_info = {}
            self.group = None

        def __call__(self, fn, *args, **kwargs):
            return fn(*args, **kwargs)

        def pedantic(self, target, args=(), kwargs=None, setup=None, **_):
            if setup is not None:
                setup()
            return target(*args, **(kwargs or {}))

    @pytest.fixture
    def benchmark():
        return _CallOnce()
