"""The single file stays livable: its map is its table of contents, and every name is defined before its use."""

from __future__ import annotations

import ast
import re

from conftest import SCRIPT

import api_request_parallel_processor as app

SOURCE = SCRIPT.read_text(encoding="utf-8")
TREE = ast.parse(SOURCE)


def banners() -> list[str]:
    """The titles of the section banners: a line of '=' above and below each."""
    return re.findall(r"^# =+\n# (.+)\n# =+$", SOURCE, flags=re.MULTILINE)


def map_titles() -> list[str]:
    """The map in the module docstring: one line per section, '- Title: what it holds'."""
    lines = (ast.get_docstring(TREE) or "").splitlines()
    return [line[2:].split(": ", 1)[0] for line in lines if line.startswith("- ")]


def test_the_map_lists_every_section_banner_in_file_order():
    assert len(banners()) >= 10
    assert map_titles() == banners()


def test_every_top_level_name_is_defined_before_any_use():
    defined: dict[str, int] = {}
    for node in TREE.body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        names = [getattr(node, "name", None)] + [name.id for target in targets if target is not None
                                                 for name in ast.walk(target) if isinstance(name, ast.Name)]
        for name in filter(None, names):
            defined.setdefault(name, node.lineno)
    early = sorted({(node.lineno, used.id) for node in TREE.body for used in ast.walk(node)
                    if isinstance(used, ast.Name) and defined.get(used.id, 0) > node.lineno})
    assert early == []


def test_time_is_read_through_one_clock_and_the_public_names_exist():
    assert SOURCE.count("time.monotonic") == 1
    assert all(callable(getattr(app, name)) for name in app.__all__)


def test_a_lines_way_names_only_what_the_file_defines():
    """The docstring's paragraph of a line's way through the file names real functions, in backquotes."""
    paragraph = (ast.get_docstring(TREE) or "").split("A line's way", 1)[1]
    names = re.findall(r"`([A-Za-z_][\w.]*)`", paragraph)
    assert len(names) >= 25 and "decide" in names and "backoff_seconds" in names
    for name in names:
        owner, _, member = name.partition(".")
        assert hasattr(app, owner) and (not member or hasattr(getattr(app, owner), member)), name


def test_pip_install_asks_for_the_same_packages_as_requirements_txt():
    """Two ways to install (the cookbook's `pip install -r requirements.txt`, and `pip install .`): one list."""
    pyproject = (SCRIPT.parent / "pyproject.toml").read_text(encoding="utf-8")
    dependencies = re.search(r"^dependencies = \[(.*)\]$", pyproject, flags=re.MULTILINE).group(1)
    requirements = (SCRIPT.parent / "requirements.txt").read_text(encoding="utf-8").split()
    assert re.findall(r'"([^"]+)"', dependencies) == requirements
