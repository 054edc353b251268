"""Every command the README and docs/ show (issue 29, item 8). Each fenced block says, in the comment above it, whether
it runs on a laptop (`<!-- runs: laptop -->`: run here as written, in a fresh folder, inside the environment) or what
it needs that a CPU machine without a hub lacks (`<!-- needs: ... -->`). Every `python` command of every block is
parsed by its command's own parser (a renamed or removed flag cannot stay in the docs), and every `make` target named
exists."""
from __future__ import annotations

import glob
import os
import re
import shlex
import subprocess

import pytest

from .jobutil import ROOT, job_env

DOCS = sorted([os.path.join(ROOT, "README.md"), os.path.join(ROOT, "datasets", "README.md"),
               os.path.join(ROOT, "infra", "README.md"), *glob.glob(os.path.join(ROOT, "docs", "*.md"))])
BLOCK = re.compile(r"(?:<!-- (runs|needs): ([^>]*?) -->\s*\n)?```(\w*)\n(.*?)```", re.S)
# what a user reads as failure or noise (each was seen on the console before)
NOISE = ("Traceback", "FutureWarning", "DeprecationWarning", "Token indices sequence length", "Loading weights",
         "\x1b[")


def blocks(path: str) -> list[tuple[str | None, str, str, str]]:
    """(runs | needs | None, what, language, text) of every fenced block of a markdown file."""
    with open(path) as f:
        return [m.groups() for m in BLOCK.finditer(f.read())]


def commands(text: str) -> list[list[str]]:
    """The block's shell commands as argv lists: continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [argv for line in joined.splitlines() if (argv := shlex.split(line, comments=True))]


def parser_of(target: str):
    """The argparse parser of a command run as `python -m MODULE`, `python SCRIPT.py` or its installed name."""
    import importlib

    module = {"jobs/generate.py": "jobs.generate", "ivmix-sample": "pipelines.sample",
              "pipelines.bivdiff": "pipelines.bivdiff.__main__"}.get(target, target)
    return importlib.import_module(module).build_parser()


def python_commands(argv: list[str]) -> list[tuple[str, list[str]]]:
    """(command, its arguments) of each python program an argv runs (`ray job submit ... -- python ...` included)."""
    found = []
    for i, word in enumerate(argv):
        if word == "python" and i + 1 < len(argv):
            rest = argv[i + 1:]
            found.append((rest[1], rest[2:]) if rest[0] == "-m" else (rest[0], rest[1:]))
        elif word == "ivmix-sample":
            found.append((word, argv[i + 1:]))
    return found


def test_every_fenced_block_says_whether_it_runs_here():
    unmarked = [(os.path.relpath(p, ROOT), text.splitlines()[0] if text else "")
                for p in DOCS for marker, what, _, text in blocks(p) if marker is None or not what.strip()]
    assert not unmarked, f"fenced blocks without <!-- runs: laptop --> or <!-- needs: ... -->: {unmarked}"
    runs = [(os.path.relpath(p, ROOT), what) for p in DOCS for marker, what, _, _ in blocks(p) if marker == "runs"]
    assert runs and all(what == "laptop" for _, what in runs), runs


@pytest.mark.heavy
def test_every_documented_python_command_parses():
    parsed = []
    for path in DOCS:
        for _, _, lang, text in blocks(path):
            if lang not in ("bash", "sh", ""):
                continue
            for argv in commands(text):
                for target, args in python_commands(argv):
                    try:
                        parser_of(target).parse_args(args)
                    except SystemExit:
                        where = os.path.relpath(path, ROOT)
                        pytest.fail(f"{where}: {target} {shlex.join(args)}: rejected by its parser")
                    parsed.append(target)
    # the README's and docs' commands of each program: both CLIs, the job, the tiny builder, VidRD's conversion
    assert {"pipelines.sample", "pipelines.bivdiff", "jobs/generate.py", "pipelines.fixtures.tiny",
            "pipelines.backbones.vidrd"} <= set(parsed), sorted(set(parsed))


def test_every_make_target_named_in_the_docs_exists():
    with open(os.path.join(ROOT, "Makefile")) as f:
        targets = set(re.findall(r"^([A-Za-z][\w-]*):", f.read(), re.M))
    named = set()
    for path in DOCS:
        with open(path) as f:
            named |= set(re.findall(r"`make ([a-z][\w-]*)", f.read()))
    assert {"demo", "test", "mlflow-ui"} <= named and named <= targets, named - targets


@pytest.mark.heavy
def test_the_laptop_blocks_run_as_written(tmp_path):
    """Each `runs: laptop` block, in order, in an empty folder, with the environment's `python` first on PATH (as after
    `source .venv/bin/activate`): exit 0, no traceback or library notice; the README's sample shows its per-step
    progress bar and writes its video."""
    env = job_env()  # its PATH starts with the environment's bin, as after activation
    ran = []
    for path in DOCS:
        for marker, _, _, text in blocks(path):
            if marker != "runs":
                continue
            for argv in commands(text):
                r = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
                assert r.returncode == 0, (argv, r.stderr[-3000:])
                assert not [n for n in NOISE if n in r.stderr], (argv, r.stderr[-3000:])
                ran.append((argv, r))
    sample = [(argv, r) for argv, r in ran if argv[:3] == ["python", "-m", "pipelines.sample"]]
    assert sample, "the README lost its laptop sample"
    argv, r = sample[0]
    assert re.search(r"sampling: 100%\|.*\| 6/6 .*model calls 26", r.stderr), r.stderr[-2000:]  # the per-step bar
    assert (tmp_path / argv[argv.index("--out") + 1]).stat().st_size > 0 and "wrote" in r.stdout
