"""The wheel is one abi3 build for every CPython >= 3.9: its Python sources
must parse as Python 3.9 (only 3.11 runs here, so a newer syntax would
otherwise go unnoticed), and scripts/test.sh checks the compiled module with
abi3audit for symbols outside the 3.9 stable ABI."""

from __future__ import annotations

import ast
from pathlib import Path

import iris
from conftest import ROOT


def python_sources():
    package = ROOT / "iris-py" / "python" / "iris"
    sources = sorted(package.glob("*.py")) + sorted(package.glob("*.pyi"))
    examples = sorted((ROOT / "examples" / "python").glob("*.py"))
    return sources + examples


def test_sources_parse_as_python_3_9():
    files = python_sources()
    assert any(f.name == "__init__.py" for f in files) and any(f.suffix == ".pyi" for f in files)
    for path in files:
        ast.parse(path.read_text(), filename=str(path), feature_version=(3, 9))


def test_newer_syntax_is_caught():
    # The check above can fail: a match statement (3.10) does not parse as 3.9.
    source = "match x:\n    case 1:\n        pass\n"
    ast.parse(source, feature_version=(3, 10))
    try:
        ast.parse(source, feature_version=(3, 9))
    except SyntaxError:
        pass
    else:
        raise AssertionError("a match statement parsed as Python 3.9")


def test_installed_package_is_the_one_tested():
    # pytest imports the installed wheel, whose Python files are the repository's.
    installed = Path(iris.__file__).read_text()
    assert installed == (ROOT / "iris-py" / "python" / "iris" / "__init__.py").read_text()
