"""Write docs/flags.md: every flag of every script, with its help and default, from the scripts'
own parsers (so the page cannot drift from the code; tests/test_docs.py checks it).

    python docs/make_flags.py
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

SCRIPTS = ("main", "annotate", "rf_svm_lr", "clus", "fig")


def _default(action) -> str:
    if action.default is None or action.default is False or action.default == argparse.SUPPRESS \
            or isinstance(action, (argparse._StoreTrueAction, argparse._StoreConstAction)):
        return ""
    default = str(action.default)
    if default.startswith(str(ROOT)):
        default = default[len(str(ROOT)) + 1:]
    return f"`{default}`"


def _help(action, parser) -> str:
    text = (action.help or "").replace("%(default)s", str(action.default)).replace("|", "\\|")
    text = text.replace(str(ROOT) + "/", "")
    return " ".join(text.split())


def _rows(parser) -> list[str]:
    rows = []
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        names = ", ".join(f"`{o}`" for o in action.option_strings)
        choices = f" (one of {', '.join(map(str, action.choices))})" if action.choices else ""
        rows.append(f"| {names} | {_default(action)} | {_help(action, parser)}{choices} |")
    return rows


def flags_markdown() -> str:
    import importlib

    lines = ["# Every flag", "", "Generated from the scripts' own parsers by `python docs/make_flags.py`; each "
             "script's `--help` says the same.", ""]
    for name in SCRIPTS:
        parser = importlib.import_module(name).build_parser()
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        parsers = [(f"{name}.py {cmd}", sub) for a in subs for cmd, sub in a.choices.items()] or [(f"{name}.py", parser)]
        for title, sub in parsers:
            lines += [f"## `{title}`", "", "| flag | default | what it does |", "|---|---|---|", *_rows(sub), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    (ROOT / "docs" / "flags.md").write_text(flags_markdown())
    print("wrote docs/flags.md")
