"""Shipped recipes stay short enough to copy (issue 19): what the recipe does, the command to
run it and a short reason per non-obvious setting, at most 15 comment lines; measurements and
the history of choices live in benchmarks/notes.md and docs/BENCHMARKS.md."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from edgesqueeze.cli import cli
from edgesqueeze.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
MAX_COMMENT_LINES = 15
COMMAND = re.compile(r"\bedgesqueeze ([a-z]+)\b")


def comment_lines(text: str) -> list[str]:
    """Lines holding a YAML comment: a full-line ``# ...`` or a trailing ``value  # ...``
    (a ``#`` after whitespace, outside quotes). Each line counts once."""
    found = []
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            found.append(line)
            continue
        quote = None
        for i, ch in enumerate(line):
            if quote:
                if ch == quote:
                    quote = None
            elif ch in "'\"" and (i == 0 or line[i - 1] in " :[{,-"):
                quote = ch
            elif ch == "#" and i > 0 and line[i - 1] in " \t":
                found.append(line)
                break
    return found


def test_comment_counting():
    text = ("# full line\n"
            "version: 1   # trailing\n"
            "name: 'a # b'\n"          # inside quotes: not a comment
            "url: x#y\n"               # no space before '#': not a comment
            "  # indented\n"
            "data: {a: 1}\n")
    assert comment_lines(text) == ["# full line", "version: 1   # trailing", "  # indented"]


def test_there_are_recipes():
    assert RECIPES, "no recipes/*.yaml found"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_is_short_and_names_its_command(path):
    text = path.read_text(encoding="utf-8")
    comments = comment_lines(text)
    assert len(comments) <= MAX_COMMENT_LINES, (
        f"{path.name}: {len(comments)} comment lines (at most {MAX_COMMENT_LINES}); move measurements "
        "and history to benchmarks/notes.md and point there")
    own = f"recipes/{path.name}"
    # a command may continue over several comment lines ending in a backslash
    joined = re.sub(r"\\\n\s*#", " ", "\n".join(comments)).splitlines()
    commands = [m.group(1) for line in joined if own in line for m in COMMAND.finditer(line)]
    assert commands, f"{path.name}: no comment line shows the command to run it (`edgesqueeze ... {own}`)"
    unknown = sorted(set(commands) - set(cli.commands))
    assert not unknown, f"{path.name}: names edgesqueeze subcommands that do not exist: {unknown}"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_points_to_its_measurements(path):
    comments = "\n".join(comment_lines(path.read_text(encoding="utf-8")))
    assert "docs/BENCHMARKS.md" in comments or "benchmarks/notes.md" in comments, (
        f"{path.name}: no pointer to docs/BENCHMARKS.md or benchmarks/notes.md")


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_loads(path):
    recipe = load_recipe(path)
    assert recipe.name == path.stem
    # a size limit on a file the recipe's own export never writes judges nothing, and every
    # command run with the recipe prints a note about it
    assert recipe.budget_formats_not_written() == [], path.name
