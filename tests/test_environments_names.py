"""Environment names -> folder names: one-to-one, and always a safe path component."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyro_mcp.environments.catalog import (
    CATALOG,
    NAME_MAX_LENGTH,
    NAME_PATTERN,
    SLUG_MAX_LENGTH,
    VERSION_SEPARATOR,
    EnvironmentSpec,
    install_folder_name,
    slug_of,
)
from pyro_mcp.errors import InvalidInputError
from test_environments import BASE, make_store

# Any text apt, OCI references or a user could name an environment with: every
# Unicode category except surrogates, from one character to far past the length cap.
names = st.text(min_size=1, max_size=300)
valid_names = st.from_regex(NAME_PATTERN, fullmatch=True).filter(
    lambda n: len(n) <= NAME_MAX_LENGTH
)


def assert_safe_component(folder: str) -> None:
    assert folder not in ("", ".", "..")
    assert not folder.startswith(".")  # hidden names are the store's temp folders
    assert "/" not in folder and "\0" not in folder
    assert len(folder.encode()) <= 255
    assert folder.isascii() and folder.isprintable()


def test_the_names_that_shared_a_folder_no_longer_do() -> None:
    assert slug_of("a_b:c") != slug_of("a:b_c")
    assert install_folder_name("a_b:c", "1") != install_folder_name("a:b_c", "1")
    # name/version boundaries cannot be moved either
    assert install_folder_name("debian:12-base", "1.0.0") != install_folder_name(
        "debian:12", "base-1.0.0"
    )
    assert slug_of("debian:12") == "debian%3A12"
    assert CATALOG["debian:12-base"].install_dirname == "debian%3A12-base@1.0.0"


@settings(max_examples=300)
@given(st.lists(names, min_size=2, max_size=8, unique=True))
def test_distinct_names_give_distinct_slugs(batch: list[str]) -> None:
    slugs = [slug_of(n) for n in batch]
    assert len(set(slugs)) == len(batch)


@settings(max_examples=300)
@given(st.lists(st.tuples(names, names), min_size=2, max_size=8, unique=True))
def test_distinct_installs_give_distinct_folders(pairs: list[tuple[str, str]]) -> None:
    folders = [install_folder_name(name, version) for name, version in pairs]
    assert len(set(folders)) == len(pairs)


@settings(max_examples=500)
@given(names, names)
def test_folders_are_safe_path_components(name: str, version: str) -> None:
    slug = slug_of(name)
    assert_safe_component(slug)
    assert len(slug) <= SLUG_MAX_LENGTH
    assert VERSION_SEPARATOR not in slug
    folder = install_folder_name(name, version)
    assert_safe_component(folder)
    # the temp and aside names built on it stay valid too
    assert len(f".tmp-{folder}-0123abcd-old".encode()) <= 255
    assert len(f".tmp-{folder}-{'0' * 16}-0123abcd".encode()) <= 255  # an unpacked tree's


@settings(max_examples=100)
@given(valid_names)
def test_catalog_style_names_stay_readable(name: str) -> None:
    """A well-formed name only has ``:`` and ``_`` escaped (no digest, no other noise)."""
    slug = slug_of(name)
    assert slug == name.replace("_", "%5F").replace(":", "%3A")


def test_empty_name_is_refused() -> None:
    with pytest.raises(InvalidInputError):
        slug_of("")


def test_long_names_end_in_a_digest() -> None:
    long_a, long_b = "x" * 200 + "a", "x" * 200 + "b"
    assert slug_of(long_a) != slug_of(long_b)
    assert slug_of(long_a).startswith("x" * 60) and "%~" in slug_of(long_a)
    assert "%~" not in slug_of("x" * SLUG_MAX_LENGTH)  # exactly at the cap: plain


def test_an_earlier_layout_install_is_not_misread(tmp_path: Path) -> None:
    """``debian_12-base-1.0.0`` (the layout before names were escaped) is neither
    returned nor trusted: the environment is rebuilt under its new folder, and
    ``prune`` removes the old one."""
    cache = tmp_path / "cache"
    log = tmp_path / "builds.log"
    store = make_store(cache, log)
    first = store.ensure(BASE)
    legacy = cache / "environments" / "debian_12-base-1.0.0"
    first.path.rename(legacy)
    again = store.ensure(BASE)
    assert again.path == cache / "environments" / "debian%3A12-base@1.0.0"
    assert len(log.read_text().splitlines()) == 2  # rebuilt, not adopted
    removed = store.prune()
    assert removed == [str(legacy)]
    assert again.rootfs.exists()


def test_a_custom_environment_next_to_a_catalog_one(tmp_path: Path) -> None:
    """Names the catalog has not heard of install into their own escaped folders."""
    store = make_store(tmp_path / "cache")
    spec = EnvironmentSpec("acme_tools:1", "2.0", "custom", ())
    twin = EnvironmentSpec("acme:tools_1", "2.0", "custom", ())
    a, b = store.ensure(spec), store.ensure(twin)
    assert a.path != b.path
    assert json.loads((a.path / "manifest.json").read_text())["name"] == "acme_tools:1"
    assert json.loads((b.path / "manifest.json").read_text())["name"] == "acme:tools_1"
