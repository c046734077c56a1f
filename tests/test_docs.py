"""Every command shown in the docs runs, as written; the generated references are current.

The ```bash blocks of README.md, docs/*.md and examples/README.md are read line
by line (backslash continuations joined). Each ``dwconvert ...`` line is run
in-process through ``dwconvert.cli.main.main`` with the same arguments, each
``python FILE.py ...`` line through ``runpy``, ``NAME=$(...)`` lines through bash,
``cd`` changes the folder, all in a temporary copy of ``examples/``. A line that
is none of these must be listed in ``NOT_RUN`` with what runs it instead, so a new
command in the docs cannot go unexercised. The ```python blocks of the documents
in ``PYTHON_RUN`` are executed too, after the commands before them.
"""

from __future__ import annotations

import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dwconvert.cli.main import SUBCOMMANDS, build_parser, main

ROOT = Path(__file__).resolve().parent.parent
DOCS = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")),
        "examples/README.md"]

# Lines that are not run here, and what runs them instead.
NOT_RUN = {
    "pip install -e .": "installs the package this suite tests",
    "pip install -e '.[data]'": "installs",
    "pip install -e '.[examples]'": "installs",
    "pip install -e '.[bench]'": "installs",
    "pip install -e '.[onnx]'": "installs",
    "pip install -e '.[plot]'": "installs",
    "pip install -e '.[examples,onnx,plot]'": "installs",
    "bash scripts/test.sh": "runs this suite",
    "bash scripts/setup.sh examples && bash examples/mnist_end_to_end.sh":
        "installs, then runs README's compress and compare once per form (by hand)",
    "dwconvert finetune mnist-dwpw.safetensors --teacher \"$CKPT\" --data mnist5k --limit 4000 "
    "--val-offset 4000 --epochs 3 -o mnist-dwpw-3.safetensors":
        "interrupted by hand; tests/test_finetune.py interrupts and resumes a run",
    "dwconvert finetune mnist-dwpw.safetensors --teacher \"$CKPT\" --data mnist5k --limit 4000 "
    "--val-offset 4000 --epochs 3 -o mnist-dwpw-3.safetensors --resume":
        "tests/test_finetune.py resumes an interrupted run and checks the weights",
    "torchrun --nproc_per_node 2 -m dwconvert finetune mnist-dwpw.safetensors --teacher "
    "\"$CKPT\" --data mnist5k --limit 4000 --val-offset 4000 --epochs 1 --lr 0.01 "
    "--batch-size 8 -o mnist-dwpw-ddp.safetensors":
        "tests/test_distributed.py runs the finetune command under torchrun",
    "bash examples/distributed_finetune.sh": "tests/test_distributed.py runs its torchrun step",
    "bash scripts/setup.sh bench && .venv/bin/python benchmarks/latency.py":
        "the latency benchmark, about an hour; its --quick mode is smoke-tested by hand",
    "dwconvert bench model.pth model-dw.safetensors --input-shape 3,224,224 --batch 1,8 "
    "--threads 2": "a user's own files; tests/test_bench_cli.py runs bench on the MNIST CNN",
}
# Documents whose commands take minutes on a shared 2-core machine.
SLOW = {"examples/README.md"}
PYTHON_RUN = {"docs/getting-started.md", "docs/finetuning.md"}


def blocks(text: str) -> list[tuple[str, str]]:
    """The fenced code blocks of a Markdown text: (language, body), in order."""
    return re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.S | re.M)


def commands(body: str) -> list[str]:
    """The command lines of a bash block, continuations joined, comments dropped."""
    joined = re.sub(r"\s*\\\n\s*", " ", body)
    lines = []
    for line in joined.splitlines():
        line = re.sub(r"\s+#.*$", "", line).strip()
        if line and not line.startswith("#"):
            lines.append(line)
    return lines


def steps(doc: str) -> list[tuple[str, str]]:
    """("bash", line) and ("python", block) in document order."""
    found = []
    for language, body in blocks((ROOT / doc).read_text(encoding="utf-8")):
        if language == "bash":
            found.extend(("bash", line) for line in commands(body))
        elif language == "python" and doc in PYTHON_RUN:
            found.append(("python", body))
    return found


class Runner:
    """Runs doc lines in a folder, as a shell in that folder would."""

    def __init__(self, folder: Path, monkeypatch, capsys) -> None:
        self.cwd = folder
        self.monkeypatch = monkeypatch
        self.capsys = capsys
        shims = folder / ".bin"
        shims.mkdir()
        for name, target in (("python", ""), ("dwconvert", "-m dwconvert")):
            shim = shims / name
            shim.write_text(f'#!/bin/sh\nexec {sys.executable} {target} "$@"\n')
            shim.chmod(0o755)
        monkeypatch.setenv("PATH", f"{shims}{os.pathsep}{os.environ['PATH']}")
        monkeypatch.setenv("PYTHONPATH", str(ROOT))

    def run(self, kind: str, text: str) -> None:
        self.monkeypatch.chdir(self.cwd)
        if kind == "python":
            exec(compile(text, "<doc block>", "exec"), {"__name__": "__doc_block__"})
            return
        assignment = re.fullmatch(r"([A-Z_][A-Z0-9_]*)=(.*)", text)
        words = shlex.split(text)
        if assignment:
            name, value = assignment.groups()
            result = subprocess.run(["bash", "-c", f"printf %s {value}"], cwd=self.cwd,
                                    capture_output=True, text=True, check=True)
            self.monkeypatch.setenv(name, result.stdout)
        elif words[0] == "cd":
            self.cwd = (self.cwd / words[1]).resolve()
        elif words[0] == "dwconvert":
            argv = [os.path.expandvars(w) for w in words[1:]]
            self.capsys.readouterr()
            code = main(argv)
            out, err = self.capsys.readouterr()
            assert code == 0, f"{text}\nexit {code}\n{out}\n{err}"
        elif words[0] == "python" and words[1].endswith(".py"):
            script = (self.cwd / words[1]).resolve()
            self.monkeypatch.setattr(sys, "argv", [str(script), *words[2:]])
            self.monkeypatch.syspath_prepend(str(script.parent))
            try:
                runpy.run_path(str(script), run_name="__main__")
            except SystemExit as exit_:
                assert exit_.code in (0, None), f"{text}: exit {exit_.code}"
        else:
            raise AssertionError(f"{text!r}: a doc command that no test runs; run it here "
                                 "or list it in NOT_RUN with what runs it")


def _params():
    for doc in DOCS:
        marks = [pytest.mark.slow] if doc in SLOW else []
        yield pytest.param(doc, marks=marks, id=doc)


@pytest.mark.usefixtures("single_thread")
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("doc", list(_params()))
def test_doc_commands_run(doc, tmp_path, monkeypatch, capsys):
    shutil.copytree(ROOT / "examples", tmp_path / "examples",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pth", "*-dw.*"))
    runner = Runner(tmp_path, monkeypatch, capsys)
    for kind, text in steps(doc):
        if kind == "bash" and text in NOT_RUN:
            continue
        runner.run(kind, text)


def test_every_doc_with_commands_is_checked():
    """The parser finds the commands: a broken fence would otherwise pass silently."""
    run = {doc: [t for k, t in steps(doc) if k == "python" or t not in NOT_RUN]
           for doc in DOCS}
    assert len(run["docs/getting-started.md"]) == 7
    assert any(t.startswith("dwconvert compress") for t in run["README.md"])
    assert any("py:shapes:test_set" in t for t in run["examples/README.md"])
    listed = {t for doc in DOCS for k, t in steps(doc) if k == "bash"}
    assert set(NOT_RUN) <= listed, "NOT_RUN names a command that no doc shows any more"


@pytest.mark.parametrize("script", ["gen_cli_docs.py", "gen_api_docs.py"])
def test_generated_references_are_current(script):
    module = runpy.run_path(str(ROOT / "scripts" / script))
    target = module["TARGET"]
    assert target.read_text(encoding="utf-8") == module["render"](), \
        f"{target.name} is out of date: run python scripts/{script}"


def _subparsers():
    parser = build_parser()
    action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return action.choices


def test_every_subcommand_help_has_an_example():
    choices = _subparsers()
    assert sorted(choices) == sorted(m.__name__.rsplit(".", 1)[-1] for m in SUBCOMMANDS)
    for name, sub in choices.items():
        text = sub.format_help()
        assert re.search(rf"^examples?:\n  dwconvert {name} ", text, flags=re.M), name


def test_options_are_spelled_one_way():
    spellings: dict[str, set[str]] = {}
    for sub in _subparsers().values():
        for action in sub._actions:
            long = [o for o in action.option_strings if o.startswith("--")]
            # --amp / --no-amp (argparse.BooleanOptionalAction) is one option.
            long = [o for o in long if not (o.startswith("--no-") and f"--{o[5:]}" in long)]
            for option in long:
                assert re.fullmatch(r"--[a-z0-9]+(-[a-z0-9]+)*", option), option
            if long:
                spellings.setdefault(action.dest, set()).update(long)
    assert {dest: names for dest, names in spellings.items() if len(names) > 1} == {}
