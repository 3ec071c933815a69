"""The documentation is whole and true to the code: links resolve (README is an index into
docs/), every code fence is closed, every Python example runs, and the cheap shell commands run.

The conventions for code blocks (docs/testing.md, "The documentation's examples"), set by the
fence's info string:

- ```` ```python ````: runs on the CPU, as written, each block alone in a fresh namespace (a
  block imports what it uses; a later block never relies on an earlier one).
- ```` ```python cuda ````: needs a CUDA GPU: run when one is present, else skipped with the reason.
- ```` ```python no-run ````: shown, never run (it trains for minutes, downloads, or needs files
  from outside the repository).
- ```` ```bash run ````: a cheap, offline shell command the test runs in the repository root;
  other shell blocks (installs, training) are shown, never run.

Every Python block is compiled, so a skipped one still fails on a syntax error.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", REPO / "bench" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# Whose Python blocks run: the README and docs/ (bench/README.md holds shell commands only).
EXAMPLE_DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PYTHON = ("python", "py")
SHELL = ("bash", "sh", "shell", "console")
SHELL_TIMEOUT_S = 300


class Block(NamedTuple):
    doc: str  # path relative to the repository
    line: int  # line of the opening fence (1-based)
    lang: str  # first word of the info string, lower case
    flags: tuple[str, ...]  # the other words
    code: str


_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>.*)$")


def parse_fences(path: Path, root: Path = REPO) -> tuple[list[Block], list[str]]:
    """(the fenced code blocks of a Markdown file, problems: fences never closed), as CommonMark
    reads them: a fence closes at a line of at least as many of the same character and no info."""
    blocks, problems = [], []
    doc = str(path.relative_to(root))
    lines = path.read_text(encoding="utf-8").splitlines()
    opened = None  # (line number, indent, fence, info words, body lines)
    for number, line in enumerate(lines, 1):
        match = _FENCE.match(line)
        if opened is None:
            if match is None:
                continue
            fence, info = match["fence"], match["info"].strip()
            if fence[0] == "`" and "`" in info:
                continue  # inline code at the start of a line, not a fence
            opened = (number, len(match["indent"]), fence, info.split(), [])
            continue
        start, indent, fence, words, body = opened
        if match is not None and match["fence"][0] == fence[0] and len(match["fence"]) >= len(fence) \
                and not match["info"].strip():
            lang = words[0].lower() if words else ""
            blocks.append(Block(doc, start, lang, tuple(w.lower() for w in words[1:]), "\n".join(body) + "\n"))
            opened = None
            continue
        # Content lines lose up to the opening fence's indentation, as CommonMark says.
        strip = min(indent, len(line) - len(line.lstrip(" ")))
        body.append(line[strip:])
    if opened is not None:
        problems.append(f"{doc}:{opened[0]}: the code fence {opened[2]}{' '.join(opened[3])} is never closed")
    return blocks, problems


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but - and _ dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    anchors, seen = set(), {}
    in_fence = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if _FENCE.match(line):
            in_fence = not in_fence
        if in_fence or not line.startswith("#"):
            continue
        slug = _slug(line.lstrip("#"))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def _all_blocks() -> list[Block]:
    return [block for doc in DOCS for block in parse_fences(doc)[0]]


def _python_blocks() -> list[Block]:
    return [b for b in _all_blocks() if b.lang in PYTHON and REPO / b.doc in EXAMPLE_DOCS]


def _shell_runs() -> list[Block]:
    return [b for b in _all_blocks() if b.lang in SHELL and "run" in b.flags]


def _id(block: Block) -> str:
    return f"{block.doc}:{block.line}"


# ----------------------------------------------------------------------------------- links

def test_relative_links_resolve():
    broken = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", text):
            if "://" in target or target.startswith("mailto:"):
                continue
            path = doc.parent / target if target else doc
            if not path.exists():
                broken.append(f"{doc.relative_to(REPO)} -> {target}")
            elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
                broken.append(f"{doc.relative_to(REPO)} -> {target}#{anchor} (no such heading)")
    assert not broken, broken


def test_readme_links_every_document():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for doc in DOCS[1:]:
        assert str(doc.relative_to(REPO)) in readme, f"README does not link {doc.relative_to(REPO)}"


# ----------------------------------------------------------------------------------- fences

def test_code_fences_are_closed():
    problems = [problem for doc in DOCS for problem in parse_fences(doc)[1]]
    assert not problems, "\n".join(problems)


def test_fence_parser_finds_an_unclosed_fence(tmp_path):
    # The check above can fail: a block left open (here, a shorter fence cannot close it).
    doc = tmp_path / "doc.md"
    doc.write_text("# t\n\n```python\nx = 1\n```\n\n````bash run\necho ```\n```\n", encoding="utf-8")
    blocks, problems = parse_fences(doc, tmp_path)
    assert [(b.line, b.lang, b.flags, b.code) for b in blocks] == [(3, "python", (), "x = 1\n")]
    assert problems == ["doc.md:7: the code fence ````bash run is never closed"]


def test_code_blocks_have_known_markers():
    known = {"python": {"cuda", "no-run"}, "bash": {"run"}}
    odd = [f"{_id(b)}: {b.lang} {' '.join(b.flags)}" for b in _all_blocks()
           if b.flags and not set(b.flags) <= known.get("python" if b.lang in PYTHON else
                                                          "bash" if b.lang in SHELL else b.lang, set())]
    assert not odd, f"unknown fence markers (see docs/testing.md): {odd}"


# ----------------------------------------------------------------------------------- Python examples

@pytest.mark.parametrize("block", _python_blocks(), ids=_id)
def test_python_example_runs(block):
    # Line numbers in a traceback are the document's.
    code = compile("\n" * block.line + block.code, block.doc, "exec")
    if "no-run" in block.flags:
        pytest.skip(f"{_id(block)} is marked no-run (shown only)")
    if "cuda" in block.flags and not torch.cuda.is_available():
        pytest.skip(f"{_id(block)} needs a CUDA GPU")
    dtype, grad = torch.get_default_dtype(), torch.is_grad_enabled()
    try:
        with warnings.catch_warnings():
            exec(code, {"__name__": "__main__", "__file__": str(REPO / block.doc)})
    finally:
        torch.set_default_dtype(dtype)
        torch.set_grad_enabled(grad)
        if "torch._dynamo" in sys.modules:
            torch._dynamo.reset()


# ----------------------------------------------------------------------------------- shell commands

@pytest.fixture(scope="module", autouse=True)
def shell_processes(request):
    """The selected ``bash run`` blocks, all started before this file's first test: they spend
    their time importing torch, which overlaps with the Python examples run in this process."""
    selected = {item.callspec.id for item in request.session.items
                if getattr(item, "originalname", None) == "test_shell_command_runs"}
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.pop("TRITON_INTERPRET", None)  # a command sets what it needs, as a reader's shell would
    processes = {}
    for block in (b for b in _shell_runs() if _id(b) in selected):
        if "fa-triton" in block.code and shutil.which("fa-triton", path=env["PATH"]) is None:
            processes[_id(block)] = "the fa-triton command is not installed (python3 -m pip install -e .)"
            continue
        processes[_id(block)] = subprocess.Popen(
            ["bash", "-e", "-o", "pipefail", "-c", block.code], cwd=REPO, env=env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        )
    yield processes
    for process in processes.values():
        if isinstance(process, subprocess.Popen) and process.poll() is None:
            _kill(process)


def _kill(process: subprocess.Popen) -> str:
    """Stop a command and everything it started (its own session); what it printed."""
    os.killpg(process.pid, signal.SIGKILL)
    return process.communicate()[0]


@pytest.mark.parametrize("block", _shell_runs(), ids=_id)
def test_shell_command_runs(block, shell_processes):
    process = shell_processes[_id(block)]
    if isinstance(process, str):
        pytest.skip(process)
    try:
        output, _ = process.communicate(timeout=SHELL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{_id(block)} ran past {SHELL_TIMEOUT_S} s:\n{block.code}\n{_kill(process)}")
    assert process.returncode == 0, f"{_id(block)} exited with {process.returncode}:\n{block.code}\n{output}"


def test_examples_are_found():
    # The collection above is not empty by accident: the README's usage example and the shell
    # commands are found.
    assert any(b.doc == "README.md" for b in _python_blocks())
    assert _shell_runs()
