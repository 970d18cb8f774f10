"""The guest environments pyro-mcp knows how to build.

An environment is a Debian root filesystem with a fixed package set. Its
``version`` names the recipe (package list, trimming, layout), not the Debian
point release: bump it whenever a change to the recipe or to
:mod:`pyro_mcp.environments.rootfs` should make installed copies stale.
"""

from __future__ import annotations

import hashlib
import re
import string
from dataclasses import dataclass

from pyro_mcp.errors import InvalidInputError, NotFoundError

#: ``family:tag`` in lower case: letters, digits and single ``.``/``-``/``_``
#: separators. No ``/``, no ``..``, nothing a path could be made of.
NAME_PATTERN = re.compile(r"[a-z][a-z0-9]*(?:[._-][a-z0-9]+)*:[a-z0-9]+(?:[._-][a-z0-9]+)*")
NAME_MAX_LENGTH = 64

DEFAULT_ENVIRONMENT = "debian:12"


@dataclass(frozen=True)
class EnvironmentSpec:
    """What to build: a Debian suite plus packages, and the guest's free disk space."""

    name: str
    version: str
    description: str
    packages: tuple[str, ...]
    suite: str = "bookworm"
    disk_free_mib: int = 1024  # free space in the image = the guest's disk limit

    @property
    def slug(self) -> str:
        """The name as a file-name component (``debian:12`` -> ``debian%3A12``)."""
        return slug_of(self.name)

    @property
    def install_dirname(self) -> str:
        """Folder name of an install of this spec (``debian%3A12@1.0.0``)."""
        return install_folder_name(self.name, self.version)


_BASE_PACKAGES: tuple[str, ...] = ()
_STANDARD_PACKAGES = ("bash", "coreutils", "git", "python3", "ca-certificates", "curl")
_BUILD_PACKAGES = (*_STANDARD_PACKAGES, "build-essential", "make", "pkg-config")

CATALOG: dict[str, EnvironmentSpec] = {
    spec.name: spec
    for spec in (
        EnvironmentSpec(
            name="debian:12",
            version="1.0.0",
            description="Debian 12 (bookworm) with bash, git, python3, curl and CA certificates",
            packages=_STANDARD_PACKAGES,
        ),
        EnvironmentSpec(
            name="debian:12-base",
            version="1.0.0",
            description="Minimal Debian 12 (bookworm): essential packages and apt only",
            packages=_BASE_PACKAGES,
        ),
        EnvironmentSpec(
            name="debian:12-build",
            version="1.0.0",
            description="debian:12 plus build-essential (gcc, make) and pkg-config",
            packages=_BUILD_PACKAGES,
            disk_free_mib=2048,
        ),
    )
}


# --------------------------------------------------------------------------- folder names

_SLUG_SAFE = frozenset(string.ascii_letters + string.digits + ".-")
#: Longer escaped names are cut and completed by ``%~`` + 32 hex digits of their sha256,
#: so an install's folder, and the temp and lock names built on it, stay under 255 bytes.
SLUG_MAX_LENGTH = 100
_LONG_MARK = "%~"
#: Between the name and the version in an install's folder name; never inside a slug.
VERSION_SEPARATOR = "@"


def slug_of(text: str) -> str:
    """File-name form of an environment name (or version), one-to-one.

    Each UTF-8 byte outside ``[A-Za-z0-9.-]``, and a leading ``.``, becomes ``%XX``
    (``debian:12`` -> ``debian%3A12``). Escaping ``%`` itself makes the mapping
    injective (``a_b:c`` -> ``a%5Fb%3Ac``, ``a:b_c`` -> ``a%3Ab%5Fc``), and a slug is
    a safe path component: never empty, ``.``, ``..`` or hidden, no ``/`` and no
    :data:`VERSION_SEPARATOR`. Names that escape to more than
    :data:`SLUG_MAX_LENGTH` characters end in a digest instead (``%~`` appears in
    no plain slug).
    """
    if not text:
        raise InvalidInputError("an environment name or version cannot be empty")
    out: list[str] = []
    for i, char in enumerate(text):
        if char in _SLUG_SAFE and not (i == 0 and char == "."):
            out.append(char)
        else:
            out.extend(f"%{byte:02X}" for byte in char.encode("utf-8", "surrogatepass"))
    slug = "".join(out)
    if len(slug) <= SLUG_MAX_LENGTH:
        return slug
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    keep = SLUG_MAX_LENGTH - len(_LONG_MARK) - len(digest)
    head = slug[:keep]
    if "%" in head[-2:]:  # do not end on half an escape
        head = head[: head.rindex("%")]
    return f"{head}{_LONG_MARK}{digest}"


def install_folder_name(name: str, version: str) -> str:
    """``<slug of name>@<slug of version>``: one folder per (name, version), one-to-one."""
    return f"{slug_of(name)}{VERSION_SEPARATOR}{slug_of(version)}"


def validate_name(name: str) -> str:
    """Return ``name`` if it is a well-formed environment name, else raise InvalidInputError."""
    if (
        not isinstance(name, str)
        or len(name) > NAME_MAX_LENGTH
        or NAME_PATTERN.fullmatch(name) is None
    ):
        raise InvalidInputError(
            f"invalid environment name {name!r}",
            hint="names look like 'debian:12' (lower-case family:tag); "
            f"available: {', '.join(sorted(CATALOG))}",
            details={"name": str(name)[:100]},
        )
    return name


def get_spec(name: str) -> EnvironmentSpec:
    """The catalog entry for ``name``.

    Raises InvalidInputError for a malformed name and NotFoundError for a
    well-formed name that is not in the catalog.
    """
    validate_name(name)
    try:
        return CATALOG[name]
    except KeyError:
        valid = ", ".join(sorted(CATALOG))
        raise NotFoundError(
            f"unknown environment {name!r}",
            hint=f"available environments: {valid}",
            details={"name": name, "available": sorted(CATALOG)},
        ) from None
