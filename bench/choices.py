"""Every choice in a tuning cache folder, as ``fa_triton.kernels.autotune.tuning_report()`` prints it.

    python -m bench.choices [--cache-dir DIR] [--output FILE] [--brief]

Each process's tuner (kernel configs, and the Triton-or-reference choice of ``backend="auto"``)
remembers its choices in ``$FA_TRITON_CACHE_DIR`` (one JSON file per GPU and versions) but its
``tuning_report()`` lists only what that process chose or loaded. This loads every entry of
every file in the folder — into the process's own ``autotune.TUNER`` when the file is of this
torch, triton and fa_triton, so the text is ``tuning_report()``'s, else into a tuner of that
file's versions — and prints the report (``--brief``: one line per choice, without the
candidates' times), writing the whole of it to ``--output``. ``bench/gpu_check.sh`` runs it
last, on the folder it gave the benchmarks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def load(directory: Path) -> list[tuple[str, str]]:
    """[(file name, report text)] for each cache file in ``directory`` (the current versions' first)."""
    from fa_triton.kernels import autotune

    current, others = [], []
    for path in sorted(Path(directory).glob("*.json")):
        try:
            data = json.loads(path.read_text())
            gpu, versions, entries = data["gpu"], data["versions"], data["entries"]
        except (OSError, ValueError, KeyError) as err:
            others.append((path.name, f"unreadable: {err}"))
            continue
        if versions == autotune.versions() and _same(autotune.cache_dir(), directory):
            tuner = autotune.TUNER
        else:
            tuner = autotune.Tuner(directory=directory, versions_of=lambda versions=versions: versions)
        for key_text in entries:
            tuner.lookup(gpu, tuple(json.loads(key_text)))
        if tuner is autotune.TUNER:
            current.append(path.name)
        else:
            others.append((path.name, tuner.report()))
    reports = []
    if current:
        reports.append((", ".join(current), autotune.tuning_report()))
    return reports + others


def _same(a, b) -> bool:
    return a is not None and Path(a).resolve() == Path(b).resolve()


def brief(report: str) -> str:
    """The report's choice lines only (not the candidates' times below each)."""
    return "\n".join(line for line in report.splitlines() if not line.startswith(" "))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="the tuning cache folder (default: $FA_TRITON_CACHE_DIR or ~/.cache/fa_triton)")
    parser.add_argument("--output", type=Path, help="write the whole report to this file")
    parser.add_argument("--brief", action="store_true", help="print one line per choice")
    args = parser.parse_args(argv)
    directory = args.cache_dir
    if directory is None:
        from fa_triton.kernels import autotune

        directory = autotune.cache_dir()
    if directory is None or not Path(directory).is_dir():
        print(f"tuning choices: no cache folder at {directory}")
        return 0
    os.environ["FA_TRITON_CACHE_DIR"] = str(directory)  # the process's own tuner reads this folder
    reports = load(Path(directory))
    if not reports:
        print(f"tuning choices: no cache file in {directory}")
        return 0
    text = "\n\n".join(f"# {name}\n{report}" for name, report in reports)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n")
    print(f"tuning choices in {directory}" + (f" (the whole report: {args.output})" if args.output else "") + ":")
    print(brief(text) if args.brief else text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
