"""Every public method of :class:`pyro_mcp.Pyro` says what it raises: a Google-style
``Raises:`` section, last in its docstring (``pyro_mcp.aio`` appends CancelledError to
it), naming only :class:`pyro_mcp.PyroError` classes a user can import from ``pyro_mcp``."""

from __future__ import annotations

import inspect
import re

import pytest

import pyro_mcp
from pyro_mcp import Pyro, PyroError

# A section header of a Google-style docstring: "Args:", "Returns:", "Raises:", ...
_SECTION = re.compile(r"^([A-Z][A-Za-z ]*):\s*$")
# An entry of the Raises section: "Name: when" or "Name, Other: when" at its indent.
_ENTRY = re.compile(r"^([A-Za-z_][\w.]*(?:\s*,\s*[A-Za-z_][\w.]*)*):\s")
#: The one entry that names no class: a method that raises nothing of pyro's own.
NOTHING = "Nothing"


def _public(cls: type) -> list[str]:
    names = ["__init__"]
    for name, value in vars(cls).items():
        if name.startswith("_"):
            continue
        if inspect.isfunction(value) or (
            isinstance(value, property) and "Raises:" in (value.__doc__ or "")
        ):
            names.append(name)
    return names


def raises_section(doc: str) -> list[str]:
    """The entries of ``doc``'s Raises section, each ``(names, text)`` flattened to its
    names; fails (AssertionError) when it is missing or not the last section."""
    lines = inspect.cleandoc(doc).splitlines()
    headers = [i for i, line in enumerate(lines) if _SECTION.match(line)]
    raises = [i for i in headers if lines[i] == "Raises:"]
    assert raises, "no Raises: section"
    assert len(raises) == 1, "more than one Raises: section"
    start = raises[0]
    assert headers[-1] == start, f"{lines[headers[-1]]} comes after Raises:"
    body = lines[start + 1 :]
    assert body and all(not line or line.startswith("    ") for line in body), (
        "the Raises: section's entries must be indented under it, up to the end"
    )
    indent = min(len(line) - len(line.lstrip()) for line in body if line.strip())
    names: list[str] = []
    for line in body:
        if not line.strip() or len(line) - len(line.lstrip()) > indent:
            continue  # a blank or a continuation line
        match = _ENTRY.match(line.strip())
        assert match, f"not a 'Name: when' entry: {line.strip()!r}"
        names += [n.strip() for n in match.group(1).split(",")]
    assert names, "an empty Raises: section"
    return names


@pytest.mark.parametrize("name", _public(Pyro))
def test_every_public_pyro_method_ends_with_a_raises_section(name: str) -> None:
    member = vars(Pyro)[name]
    doc = (member.fget if isinstance(member, property) else member).__doc__
    assert doc, f"Pyro.{name} has no docstring"
    try:
        names = raises_section(doc)
    except AssertionError as exc:
        pytest.fail(f"Pyro.{name}: {exc}")
    if names == [NOTHING]:
        return
    assert NOTHING not in names, f"Pyro.{name}: 'Nothing' must be the only entry"
    for exc_name in names:
        cls = getattr(pyro_mcp, exc_name, None)
        assert isinstance(cls, type) and issubclass(cls, PyroError), (
            f"Pyro.{name} names {exc_name}, which is no PyroError importable from pyro_mcp"
        )


def test_the_async_twins_keep_the_raises_section_last() -> None:
    from pyro_mcp import AsyncPyro

    for name in _public(Pyro):
        twin = getattr(AsyncPyro, name, None)
        if name == "__init__" or not inspect.iscoroutinefunction(twin):
            continue
        doc = inspect.cleandoc(twin.__doc__ or "")
        sync = inspect.cleandoc(vars(Pyro)[name].__doc__ or "")
        if sync not in doc:
            continue  # a twin with a docstring of its own (task, get_task)
        # aio appends its CancelledError entry to the sync Raises section, so it must be last
        entries = doc.split(sync, 1)[1].split("\n\n", 1)[0]
        assert "CancelledError" in entries, name


@pytest.mark.parametrize(
    ("doc", "problem"),
    [
        ("Summary.", "no Raises"),
        ("Summary.\n\nRaises:\n    NotFoundError: x.\n\nReturns:\n    y.", "comes after"),
        ("Summary.\n\nRaises:\n    not an entry\n", "not a 'Name: when'"),
    ],
)
def test_the_check_catches_bad_sections(doc: str, problem: str) -> None:
    with pytest.raises(AssertionError, match=problem):
        raises_section(doc)


def test_the_check_reads_entries() -> None:
    doc = """Summary.

    Raises:
        InvalidInputError: a bad
            option.
        BootError, LimitError: no VM.
    """
    assert raises_section(doc) == ["InvalidInputError", "BootError", "LimitError"]
