"""The guest environments pyro-mcp knows how to build.

An environment is a Debian root filesystem with a fixed package set. Its
``version`` names the recipe (package list, trimming, layout), not the Debian
point release: bump it whenever a change to the recipe or to
:mod:`pyro_mcp.environments.rootfs` should make installed copies stale.
"""

from __future__ import annotations

import re
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
        """The name as a file-name component (``debian:12`` -> ``debian_12``)."""
        return slug_of(self.name)

    @property
    def install_dirname(self) -> str:
        """Folder name of an install of this spec: ``<slug>-<version>``."""
        return f"{self.slug}-{self.version}"


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


def slug_of(name: str) -> str:
    """File-name form of a (validated) environment name."""
    return name.replace(":", "_")


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
