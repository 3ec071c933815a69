"""``python -m fa_triton ...``: the ``fa-triton`` command line (see :mod:`fa_triton.experiments.cli`)."""

from .experiments.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
