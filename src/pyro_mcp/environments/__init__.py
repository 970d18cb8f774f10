"""Guest environments: a Debian root filesystem image plus the guest kernel.

Built locally from Debian packages (``mmdebstrap``/``debootstrap`` + ``mkfs.ext4``;
the kernel is Debian's ``linux-image-cloud-amd64``), cached and verified by
:class:`pyro_mcp.environments.store.EnvironmentStore`. One module per job (see
docs/environments.md), imported by name; this package imports none of them, so
that reaching one (``environments.tree`` from a backend) does not load the rest:

* ``catalog``: the environments pyro-mcp builds; names and their folder names
* ``store``: installed environments (build once, verify before each use, prune)
* ``kernel`` / ``kernel_cache``: fetching the guest kernel / caching it
* ``rootfs`` (with ``apt``): building an image; ``tree``: an image unpacked to a folder
* ``integrity`` (manifests, fingerprints), ``cachefs`` (locks, atomic folder swaps)
  and ``tools`` (running host tools), shared by the above
"""
