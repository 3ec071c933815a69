"""Launch configs measured on real GPUs by ``bench/sweep.py`` (``--emit-table`` writes this file).

Keys: (GPU name as torch reports it,) + ``tuning.problem_key(...)`` — kernel, dtype name, dot
precision, activation, flags, TMA allowed, sizes with the batch bucketed; values:
the fields of the fastest ``LaunchConfig`` measured for that key (a dict). A key found here is used without tuning;
any other key is tuned at run time (see ``tuning.select_config``).

No GPU sweep has been run into this table yet: it is empty, and every GPU key is tuned at run time.
"""

TABLE: dict = {}
