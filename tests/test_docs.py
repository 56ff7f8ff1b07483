"""The documentation cannot drift from the code: the flags page is the parsers' own, every command
in the README parses and names files a fresh clone has, and the README stays short."""
import importlib
import re
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "docs")]


def readme_commands() -> list[list[str]]:
    """The ``python SCRIPT.py ...`` command lines of the README's bash blocks (continuations joined)."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for part in re.split(r"&&|;", line.split("#")[0]):
                words = shlex.split(part)
                if len(words) >= 2 and words[0] == "python" and words[1].endswith(".py"):
                    commands.append(words[1:])
    return commands


def test_the_flags_page_is_generated_from_the_parsers():
    import make_flags

    assert (ROOT / "docs" / "flags.md").read_text() == make_flags.flags_markdown(), \
        "docs/flags.md is stale: run python docs/make_flags.py"


def test_the_readme_is_short_and_links_to_pages_that_exist():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    for link in re.findall(r"\]\(((?:docs|bench)/[^)]+)\)", text):
        assert (ROOT / link).exists(), link


@pytest.mark.parametrize("command", readme_commands(), ids=lambda c: " ".join(c)[:60])
def test_every_readme_command_parses_and_names_files_a_clone_has(command):
    script, argv = command[0], command[1:]
    if script.startswith("bench/") or script.startswith("docs/"):
        assert (ROOT / script).exists()
        return
    module = importlib.import_module(script[:-3])
    argv = [a.replace("$clf", "svm") for a in argv]
    module.parse_args(argv)  # every flag exists and every value is accepted
    for value in argv:
        if value.startswith("dataset/"):
            assert (ROOT / value).exists(), value


def test_the_readme_runs_the_original_command_lines():
    commands = [" ".join(c) for c in readme_commands()]
    for original in ("main.py --is_pretrain --kmeans", "main.py --kmeans", "fig.py"):
        assert any(c.startswith(original) for c in commands)
