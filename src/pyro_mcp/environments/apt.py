"""The host's apt configuration, read to find the Debian mirror a build uses.

Both formats apt reads: classic one-line ``sources.list`` entries and deb822
``*.sources`` stanzas. :func:`debian_mirror_lines` turns them into the ``deb``
lines a bootstrap of one suite needs; ``PYRO_DEBIAN_MIRROR`` overrides them.
No host name is hard-coded.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pyro_mcp.errors import EnvironmentBuildError

MIRROR_ENV = "PYRO_DEBIAN_MIRROR"


@dataclass(frozen=True)
class AptSource:
    """One enabled ``deb`` entry of the host's apt configuration."""

    uri: str
    suites: tuple[str, ...]
    components: tuple[str, ...]
    signed_by: str | None = None
    origin: str = ""  # the file it came from


def parse_one_line_sources(text: str, origin: str = "") -> list[AptSource]:
    """Entries of a classic ``sources.list`` (``deb [opts] uri suite comp...``)."""
    out: list[AptSource] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line.startswith("deb "):
            continue
        rest = line[4:].strip()
        options: dict[str, str] = {}
        if rest.startswith("["):
            opts, _, rest = rest[1:].partition("]")
            for opt in opts.split():
                key, _, value = opt.partition("=")
                options[key] = value
        parts = rest.split()
        if len(parts) < 2:
            continue
        out.append(
            AptSource(
                uri=parts[0],
                suites=(parts[1],),
                components=tuple(parts[2:]),
                signed_by=options.get("signed-by"),
                origin=origin,
            )
        )
    return out


def parse_deb822_sources(text: str, origin: str = "") -> list[AptSource]:
    """Entries of a deb822 ``*.sources`` file (stanzas separated by blank lines)."""
    out: list[AptSource] = []
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key: str | None = None
        for raw in stanza.splitlines():
            if raw.startswith("#") or not raw.strip():
                continue
            if raw[0] in " \t" and key is not None:
                fields[key] += "\n" + raw.strip()
                continue
            key, sep, value = raw.partition(":")
            if not sep:
                key = None
                continue
            key = key.strip().lower()
            fields[key] = value.strip()
        if "deb" not in fields.get("types", "").split():
            continue
        if fields.get("enabled", "yes").lower() in {"no", "false", "0"}:
            continue
        signed_by = fields.get("signed-by")
        if signed_by is not None and "\n" in signed_by:
            signed_by = None  # an inline key: let the bootstrapper find its own
        for uri in fields.get("uris", "").split():
            out.append(
                AptSource(
                    uri=uri,
                    suites=tuple(fields.get("suites", "").split()),
                    components=tuple(fields.get("components", "").split()),
                    signed_by=signed_by,
                    origin=origin,
                )
            )
    return out


def read_apt_sources(apt_dir: Path = Path("/etc/apt")) -> list[AptSource]:
    """All enabled ``deb`` entries of the host's apt configuration."""
    sources: list[AptSource] = []
    main = apt_dir / "sources.list"
    if main.is_file():
        sources += parse_one_line_sources(main.read_text(errors="replace"), str(main))
    parts = apt_dir / "sources.list.d"
    if parts.is_dir():
        for path in sorted(parts.iterdir()):
            if path.suffix == ".list" and path.is_file():
                sources += parse_one_line_sources(path.read_text(errors="replace"), str(path))
            elif path.suffix == ".sources" and path.is_file():
                sources += parse_deb822_sources(path.read_text(errors="replace"), str(path))
    return sources


def debian_mirror_lines(
    suite: str,
    sources: Sequence[AptSource] | None = None,
    environ: Mapping[str, str] | None = None,
) -> list[str]:
    """One-line ``deb`` entries for ``suite``, ``suite-updates`` and ``suite-security``.

    Taken from the host's apt configuration (entries whose suite is exactly one
    of those three and whose components include ``main``); ``PYRO_DEBIAN_MIRROR``
    replaces them with ``<mirror> suite`` and ``<mirror> suite-updates``. The
    first line is always the main suite. Raises EnvironmentBuildError when the
    host has no entry for ``suite``.
    """
    env = os.environ if environ is None else environ
    override = env.get(MIRROR_ENV, "").strip()
    if override:
        return [f"deb {override} {suite} main", f"deb {override} {suite}-updates main"]
    if sources is None:
        sources = read_apt_sources()
    wanted = (suite, f"{suite}-updates", f"{suite}-security", f"{suite}/updates")
    lines: dict[str, list[str]] = {s: [] for s in wanted}
    for src in sources:
        components = [c for c in src.components if c in _DEBIAN_COMPONENTS]
        if "main" not in components:
            continue
        opts = f"[signed-by={src.signed_by}] " if src.signed_by else ""
        for s in src.suites:
            if s in lines:
                line = f"deb {opts}{src.uri} {s} {' '.join(components)}"
                if line not in lines[s]:
                    lines[s].append(line)
    if not lines[suite]:
        raise EnvironmentBuildError(
            f"no Debian mirror for {suite!r} in the host's apt sources",
            hint=f"add a '{suite} main' entry to /etc/apt/sources.list(.d) or set "
            f"{MIRROR_ENV}=http://<mirror>/debian",
        )
    return [line for s in wanted for line in lines[s]]


def redact_credentials(line: str) -> str:
    """``line`` with any ``user:password@`` of a URI replaced by ``***@`` (for manifests)."""
    return _CREDENTIALS.sub(r"\1***@", line)


_DEBIAN_COMPONENTS = ("main", "contrib", "non-free", "non-free-firmware")
_CREDENTIALS = re.compile(r"(://)[^/@\s]+@")  # user:password@ in a mirror URI


__all__ = [
    "MIRROR_ENV",
    "AptSource",
    "debian_mirror_lines",
    "parse_deb822_sources",
    "parse_one_line_sources",
    "read_apt_sources",
    "redact_credentials",
]
