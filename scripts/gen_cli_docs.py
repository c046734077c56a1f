"""Write docs/cli.md from the argparse parsers of the command line.

    python scripts/gen_cli_docs.py          # rewrite docs/cli.md
    python scripts/gen_cli_docs.py --check  # exit 1 if docs/cli.md is out of date

The help is rendered at a fixed width, so the file does not depend on the terminal.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET = ROOT / "docs" / "cli.md"
WIDTH = 100

HEADER = """# Command-line reference

Generated from the parsers by `python scripts/gen_cli_docs.py`; do not edit by hand.
Every subcommand also prints this with `--help`. Global options (`-v`, `-q`,
`--progress`, `--debug`) go before the subcommand: `dwconvert -q compress ...`.
`python -m dwconvert` is the same program.
"""


def render() -> str:
    """The Markdown text of the reference, from the current parsers."""
    sys.path.insert(0, str(ROOT))
    from dwconvert.cli.main import SUBCOMMANDS, build_parser

    saved = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(WIDTH + 2)  # argparse wraps at COLUMNS - 2
    try:
        parser = build_parser()
        subparsers = next(a for a in parser._actions
                          if isinstance(a, argparse._SubParsersAction))
        sections = [HEADER, "## dwconvert\n", "```text\n" + parser.format_help() + "```\n"]
        for module in SUBCOMMANDS:
            name = module.__name__.rsplit(".", 1)[-1]
            sub = subparsers.choices[name]
            sections.append(f"## dwconvert {name}\n")
            sections.append("```text\n" + sub.format_help() + "```\n")
    finally:
        if saved is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = saved
    return "\n".join(sections)


def main() -> int:
    check = "--check" in sys.argv[1:]
    text = render()
    if check:
        if not TARGET.exists() or TARGET.read_text(encoding="utf-8") != text:
            print(f"{TARGET} is out of date: run python scripts/gen_cli_docs.py",
                  file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text, encoding="utf-8")
    print(f"wrote {TARGET}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
