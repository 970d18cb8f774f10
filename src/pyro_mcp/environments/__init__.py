"""Guest environments: a Debian root filesystem image plus the guest kernel.

Built locally from Debian packages (``mmdebstrap``/``debootstrap`` + ``mkfs.ext4``;
the kernel is Debian's ``linux-image-cloud-amd64``), cached and verified by
:class:`EnvironmentStore`. See docs/environments.md.
"""

from pyro_mcp.environments.catalog import (
    CATALOG,
    DEFAULT_ENVIRONMENT,
    EnvironmentSpec,
    get_spec,
    validate_name,
)
from pyro_mcp.environments.kernel import KernelArtifact, ensure_kernel, extract_vmlinux
from pyro_mcp.environments.store import (
    EnvironmentInfo,
    EnvironmentStore,
    InstalledEnvironment,
)

__all__ = [
    "CATALOG",
    "DEFAULT_ENVIRONMENT",
    "EnvironmentInfo",
    "EnvironmentSpec",
    "EnvironmentStore",
    "InstalledEnvironment",
    "KernelArtifact",
    "ensure_kernel",
    "extract_vmlinux",
    "get_spec",
    "validate_name",
]
