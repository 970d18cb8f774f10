"""Hostile input from the host side and from the guest's side of the agent channel.

* Every public SDK entry point gets junk (ids with path tricks, environment
  names, host paths, sizes, timeouts, env var names, commands): each call works
  or raises a :class:`PyroError` with a message, nothing else escapes, and
  nothing is written outside the state and cache folders.
* The CLI turns the same kind of junk into exit status 125 and a message on
  stderr, never a traceback.
* The host's agent channel is fed valid frames out of order, stray frames and
  garbage, split anywhere: it never raises, delivers exactly what the reference
  decoder decodes, and closes every waiting request once the stream breaks.
  (The frame decoder itself is fuzzed in tests/test_protocol.py: 3000 random
  streams, 2000 random payloads, 3000 mutated frames, 500 round trips.)
* Seeds: the hostile-archive corpus of tests/test_workspace_seed.py extended
  (links through links, case and unicode tricks, very long names, many small
  files, sparse members, truncated and corrupt compressed streams), a
  mutation fuzz of real archives, and the rule that a rejected seed leaves
  nothing behind.

No VM boots here: argument combinations that would boot one are filtered out.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pyro_mcp import limits
from pyro_mcp.api import Pyro
from pyro_mcp.environments.catalog import CATALOG
from pyro_mcp.errors import PyroError
from pyro_mcp.guest import protocol as p
from pyro_mcp.guest.channel import AgentChannel, ChannelClosed
from pyro_mcp.workspace.archive import SeedLimits, UnsafeSeedError
from pyro_mcp.workspace.seed import seed_tree

PYRO = Path(sys.executable).parent / "pyro"
FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# ------------------------------------------------------------------ junk


TRICKY_TEXT = [
    "",
    " ",
    ".",
    "..",
    "../x",
    "../../../../etc/passwd",
    "/etc/passwd",
    "/",
    "~",
    "~root/.ssh",
    "$HOME",
    "`id`",
    "$(id)",
    "%s%s%n",
    "-rf",
    "--help",
    "*",
    "\\..\\..\\x",
    "\n",
    "a\nb",
    "a\x00b",
    "\udc80",
    "\u202e",
    "\uff0e\uff0e/x",
    "x" * 5000,
    "vm-",
    "vm-../../x",
    "vm-0123456789ab/../../x",
    "vm-0123456789ab\n",
    "vm-0123456789AB",
    "vm-0123456789abc",
    "vm-0123456789ab",
    "task-../../x",
    "task-0123456789ab\n",
    "task-0123456789ab",
    "debian:12/../../x",
    "debian:12\x00",
    "DEBIAN:12",
    " debian:12",
    "debian:12-base\n",
    "debian",
    "nosuch:1",
    "/dev/null",
    "/proc/self/mem",
    "/dev/zero",
]
junk_text = st.one_of(st.sampled_from(TRICKY_TEXT), st.text(max_size=30))
junk_scalar = st.one_of(
    junk_text,
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.binary(max_size=12),
)
junk = st.one_of(
    junk_scalar,
    st.lists(junk_scalar, max_size=3),
    st.dictionaries(junk_text, junk_scalar, max_size=3),
)
env_names = st.one_of(st.sampled_from(sorted(CATALOG)), junk)
ids = st.one_of(junk, st.from_regex(r"\A(vm|task)-[0-9a-f]{12}\Z"))


def sized(valid: list[int]) -> st.SearchStrategy[object]:
    return st.one_of(st.sampled_from(valid), junk)


vcpus = sized([1, 2])
mems = sized([limits.MIN_MEM_MIB, limits.DEFAULT_MEM_MIB])
timeouts = sized([1, 30])
ttls = sized([limits.MIN_TTL_SECONDS, 600])
caps = sized([1024, limits.DEFAULT_OUTPUT_CAP])
commands = st.one_of(
    junk, st.lists(junk_text, max_size=3), st.sampled_from(["true", "echo hi", ["ls", "-l"]])
)
cwds = st.one_of(junk, st.sampled_from(["/root", "/workspace", "/"]))
envs = st.one_of(
    st.none(),
    junk,
    st.dictionaries(junk_text, junk_text, max_size=3),
    st.sampled_from([{"A": "b"}, {"PATH": "/bin"}, {"A\n": "b"}, {"1A": "b"}, {"A": "b\x00"}]),
)
networks = st.one_of(st.booleans(), junk)


def passes(check: Callable[..., object], *args: object) -> bool:
    try:
        check(*args)
    except PyroError:
        return False
    return True


def valid_env_name(name: object) -> bool:
    return isinstance(name, str) and name in CATALOG


def would_boot_vm(
    environment: object, vcpu: object, mem: object, ttl: object, network: object
) -> bool:
    return (
        valid_env_name(environment)
        and passes(limits.check_vcpu_count, vcpu)
        and passes(limits.check_mem_mib, mem)
        and passes(limits.check_ttl, ttl)
        and network is False
    )


# ---------------------------------------------------------------- sandbox


@pytest.fixture
def sandbox(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Path]]:
    """A private folder holding the state dir, the cache dir, HOME, the working
    directory and some bait; after the test, everything but state and cache must be
    exactly as before."""
    root = Path(tempfile.mkdtemp(prefix="pyro-fz-"))
    box = {name: root / name for name in ("state", "cache", "home", "cwd", "bait")}
    for path in box.values():
        path.mkdir()
    (box["bait"] / "keep.txt").write_text("original")
    (box["home"] / ".profile").write_text("# bait\n")
    (box["cwd"] / "x").mkdir()
    box["root"] = root
    monkeypatch.setenv("PYRO_STATE_DIR", str(box["state"]))
    monkeypatch.setenv("PYRO_CACHE_DIR", str(box["cache"]))
    monkeypatch.setenv("HOME", str(box["home"]))
    for var in ("XDG_STATE_HOME", "XDG_CACHE_HOME", "XDG_DATA_HOME", "XDG_CONFIG_HOME"):
        monkeypatch.setenv(var, str(box["home"] / var.lower()))
    monkeypatch.chdir(box["cwd"])
    before = snapshot_outside(box)
    yield box
    assert snapshot_outside(box) == before, "something was written outside state and cache"
    shutil.rmtree(root, ignore_errors=True)


def snapshot_outside(box: Mapping[str, Path]) -> dict[str, tuple[int, str]]:
    out: dict[str, tuple[int, str]] = {}
    skip = {box["state"], box["cache"]}
    for dirpath, dirnames, filenames in os.walk(box["root"]):
        dirnames[:] = [d for d in dirnames if Path(dirpath) / d not in skip]
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st_ = path.lstat()
            if stat.S_ISREG(st_.st_mode):
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
            elif stat.S_ISLNK(st_.st_mode):
                digest = os.readlink(path)
            else:
                digest = ""
            out[str(path.relative_to(box["root"]))] = (st_.st_mode, digest)
    return out


def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Works, or raises a PyroError that says what is wrong; anything else fails."""
    try:
        return fn(*args, **kwargs)
    except PyroError as exc:
        assert exc.message.strip(), f"{type(exc).__name__} without a message"
        assert exc.code
        return exc


# ------------------------------------------------------------------ the SDK


@FUZZ
@given(
    backend=st.one_of(st.none(), st.sampled_from(["auto", "qemu"]), junk),
    pool_size=st.one_of(st.just(0), junk),
    pool_environment=env_names,
    state_dir=st.one_of(st.none(), junk),
)
def test_pyro_constructor(
    sandbox: dict[str, Path],
    backend: object,
    pool_size: object,
    pool_environment: object,
    state_dir: object,
) -> None:
    # A real pool would boot VMs; a state folder the caller names is theirs to choose.
    assume(
        not (passes(limits.check_int, "p", pool_size, 1, 8) and valid_env_name(pool_environment))
    )
    assume(not (isinstance(state_dir, str) and state_dir and "\x00" not in state_dir))
    result = call(
        Pyro,
        backend=backend,
        pool_size=pool_size,
        pool_environment=pool_environment,
        state_dir=state_dir,
    )
    if isinstance(result, Pyro):
        call(result.list_vms)
        call(result.list_tasks)
        call(result.close)


@FUZZ
@given(name=env_names, force=st.one_of(st.booleans(), junk))
def test_environment_calls(sandbox: dict[str, Path], name: object, force: object) -> None:
    assume(not valid_env_name(name))  # a valid name would build an environment
    pyro = Pyro()
    call(pyro.pull_environment, name, force=force)
    environments = call(pyro.list_environments)
    assert isinstance(environments, list)


@FUZZ
@given(
    environment=env_names,
    command=commands,
    vcpu=vcpus,
    mem=mems,
    timeout=timeouts,
    ttl=ttls,
    network=networks,
    cwd=cwds,
    env=envs,
    stdout_cap=caps,
    stderr_cap=caps,
)
def test_run_in_vm(
    sandbox: dict[str, Path],
    environment: object,
    command: object,
    vcpu: object,
    mem: object,
    timeout: object,
    ttl: object,
    network: object,
    cwd: object,
    env: object,
    stdout_cap: object,
    stderr_cap: object,
) -> None:
    assume(
        not (
            would_boot_vm(environment, vcpu, mem, ttl, network)
            and passes(limits.check_command, command)
            and passes(limits.check_env, env)
            and passes(limits.check_cwd, cwd)
            and passes(limits.check_timeout, timeout)
            and passes(limits.check_output_cap, "stdout_cap", stdout_cap)
            and passes(limits.check_output_cap, "stderr_cap", stderr_cap)
        )
    )
    result = call(
        Pyro(reap=False).run_in_vm,
        environment,
        command,
        vcpu_count=vcpu,
        mem_mib=mem,
        timeout_seconds=timeout,
        ttl_seconds=ttl,
        network=network,
        cwd=cwd,
        env=env,
        stdout_cap=stdout_cap,
        stderr_cap=stderr_cap,
    )
    assert isinstance(result, PyroError)
    assert list((sandbox["state"] / "vms").glob("vm-*")) == []  # a refused run leaves nothing


@FUZZ
@given(environment=env_names, vcpu=vcpus, mem=mems, ttl=ttls, network=networks)
def test_create_vm(
    sandbox: dict[str, Path],
    environment: object,
    vcpu: object,
    mem: object,
    ttl: object,
    network: object,
) -> None:
    """Creating only writes a record (no boot), so valid combinations are kept too."""
    pyro = Pyro(reap=False)
    result = call(
        pyro.create_vm, environment, vcpu_count=vcpu, mem_mib=mem, ttl_seconds=ttl, network=network
    )
    if not isinstance(result, PyroError):
        assert (sandbox["state"] / "vms" / result.vm_id / "vm.json").is_file()
        call(pyro.delete_vm, result.vm_id)


@FUZZ
@given(
    vm_id=ids,
    command=commands,
    timeout=timeouts,
    cwd=cwds,
    env=envs,
    stdout_cap=caps,
    stderr_cap=caps,
)
def test_vm_id_calls(
    sandbox: dict[str, Path],
    vm_id: object,
    command: object,
    timeout: object,
    cwd: object,
    env: object,
    stdout_cap: object,
    stderr_cap: object,
) -> None:
    pyro = Pyro(reap=False)
    for method in (pyro.start_vm, pyro.stop_vm, pyro.status_vm, pyro.network_info_vm):
        assert isinstance(call(method, vm_id), PyroError)
    assert isinstance(call(pyro.delete_vm, vm_id), PyroError)
    assert isinstance(
        call(
            pyro.exec_vm,
            vm_id,
            command,
            timeout_seconds=timeout,
            cwd=cwd,
            env=env,
            stdout_cap=stdout_cap,
            stderr_cap=stderr_cap,
        ),
        PyroError,
    )


@FUZZ
@given(
    environment=env_names,
    source_path=st.one_of(st.none(), junk),
    vcpu=vcpus,
    mem=mems,
    ttl=ttls,
    network=networks,
    exclude=st.one_of(st.just(()), junk, st.lists(junk, max_size=2)),
    seed_limits=st.one_of(st.none(), junk, st.just(SeedLimits(max_entries=1))),
)
def test_create_task(
    sandbox: dict[str, Path],
    environment: object,
    source_path: object,
    vcpu: object,
    mem: object,
    ttl: object,
    network: object,
    exclude: object,
    seed_limits: object,
) -> None:
    source_exists = isinstance(source_path, str) and (
        "\x00" not in source_path
        and source_path != ""
        and os.path.lexists(os.path.expanduser(source_path))
    )
    assume(
        not (
            would_boot_vm(environment, vcpu, mem, ttl, network)
            and (source_path is None or source_exists)
        )
    )
    result = call(
        Pyro(reap=False).create_task,
        environment,
        source_path=source_path,
        vcpu_count=vcpu,
        mem_mib=mem,
        ttl_seconds=ttl,
        network=network,
        exclude=exclude,
        seed_limits=seed_limits,
    )
    assert isinstance(result, PyroError)
    assert list((sandbox["state"] / "tasks").glob("task-*")) == []  # nothing left behind


@FUZZ
@given(task_id=ids, command=commands, timeout=timeouts, cwd=cwds, env=envs, cap=caps)
def test_task_id_calls(
    sandbox: dict[str, Path],
    task_id: object,
    command: object,
    timeout: object,
    cwd: object,
    env: object,
    cap: object,
) -> None:
    pyro = Pyro(reap=False)
    for method in (pyro.status_task, pyro.delete_task):
        assert isinstance(call(method, task_id), PyroError)
    result = call(
        pyro.exec_task,
        task_id,
        command,
        timeout_seconds=timeout,
        cwd=cwd,
        env=env,
        stdout_cap=cap,
        stderr_cap=cap,
    )
    assert isinstance(result, PyroError)
    assert call(pyro.list_tasks) == []
    assert not isinstance(call(pyro.reap_expired), PyroError)


# ------------------------------------------------------------------ the CLI


@pytest.mark.parametrize(
    "args",
    [
        ["vm", "status", "../x"],
        ["vm", "status", "vm-0123456789ab/../../etc"],
        ["vm", "delete", "vm-../../etc"],
        ["vm", "status", "vm-0123456789ab"],
        ["run", "debian:12/../../x", "--", "true"],
        ["run", "", "--", "true"],
        ["run", "debian:12-base", "--mem-mib", "99999999", "--", "true"],
        ["run", "debian:12-base", "--timeout-seconds", "0", "--", "true"],
        ["run", "debian:12-base", "--vcpu-count", "abc", "--", "true"],
        ["task", "exec", "task-../x", "--", "true"],
        ["task", "delete", "../../etc"],
        ["task", "exec", "task-0123456789ab", "--env", "1BAD=x", "--", "true"],
        ["task", "create", "debian:12-base", "--source-path", "/no/such/dir"],
        ["env", "pull", "../../etc/passwd"],
        ["env", "inspect", "x" * 5000],
    ],
    ids=lambda a: " ".join(a)[:40],
)
def test_cli_junk_is_exit_125_with_a_message(sandbox: dict[str, Path], args: list[str]) -> None:
    proc = subprocess.run(
        [str(PYRO), *args], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 125, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert "pyro: error:" in proc.stderr or "Error:" in proc.stderr, proc.stderr
    assert proc.stdout == ""


# ------------------------------------------------- the agent channel, from the guest


class ScriptedGuest:
    """The guest end of a channel: hands out prepared chunks once released, then EOF."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = list(chunks)
        self.go = threading.Event()

    def read(self, size: int) -> bytes:
        self.go.wait(10)
        return self.chunks.pop(0) if self.chunks else b""

    def write(self, data: bytes) -> None:
        pass


wire_text = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=8)
guest_messages = st.one_of(
    st.builds(p.Hello, st.integers(0, 2**32 - 1), wire_text, st.integers(0, 2**64 - 1)),
    st.just(p.InitOk()),
    st.builds(p.Output, st.sampled_from([p.STDOUT, p.STDERR]), st.binary(max_size=64)),
    st.builds(
        p.Exit,
        st.integers(-(2**31), 2**31 - 1),
        st.integers(0, 64),
        st.booleans(),
        st.booleans(),
        st.booleans(),
        st.integers(0, 2**64 - 1),
    ),
    st.builds(p.Error, st.integers(0, 2**32 - 1), wire_text),
    st.just(p.Pong()),
)


@st.composite
def guest_streams(draw: st.DrawFn) -> list[bytes]:
    """Valid frames for ids 0..4 in any order, maybe garbage somewhere, split anywhere."""
    parts: list[bytes] = []
    for _ in range(draw(st.integers(0, 12))):
        if draw(st.integers(0, 9)) == 0:
            parts.append(draw(st.binary(min_size=1, max_size=40)))
            continue
        message = draw(guest_messages)
        rid = 0 if isinstance(message, p.Hello) else draw(st.integers(0, 4))
        parts.append(p.encode(rid, message))
    stream = b"".join(parts)
    cuts = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    bounds = [0, *cuts, len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(bounds) if b > a]


@settings(max_examples=600, deadline=None)
@given(chunks=guest_streams())
def test_agent_channel_survives_any_guest_stream(chunks: list[bytes]) -> None:
    # What a correct host must see: the reference decoder over the same chunks.
    reference = p.FrameDecoder(p.GUEST_TO_HOST)
    expected: list[tuple[int, p.Message]] = []
    broken = False
    for chunk in chunks:
        try:
            expected += reference.feed(chunk)
        except PyroError:
            broken = True
            break

    guest = ScriptedGuest(chunks)
    channel = AgentChannel(guest)
    queues = {}
    for _ in range(4):
        rid, q = channel.open()
        queues[rid] = q
    guest.go.set()
    channel._thread.join(10)
    assert not channel._thread.is_alive()
    assert channel.closed_reason is not None
    assert ("protocol" in channel.closed_reason) == broken

    for rid, q in queues.items():
        got = []
        while not q.empty():
            got.append(q.get_nowait())
        assert isinstance(got[-1], ChannelClosed)  # everyone waiting learns the end
        assert got[:-1] == [m for r, m in expected if r == rid and not isinstance(m, p.Hello)]
    hellos = [m for _, m in expected if isinstance(m, p.Hello)]
    seen: list[object] = []
    while not channel._hello.empty():
        seen.append(channel._hello.get_nowait())
    assert isinstance(seen[-1], ChannelClosed)
    assert seen[:-1] == hellos[:1]  # the first HELLO; later ones are dropped


# --------------------------------------------------------------------- seeds

Member = tuple[tarfile.TarInfo, bytes | None]


def _file(name: str, data: bytes = b"x") -> Member:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    ti.mode = 0o644
    return ti, data


def _dir(name: str) -> Member:
    ti = tarfile.TarInfo(name)
    ti.type = tarfile.DIRTYPE
    ti.mode = 0o755
    return ti, None


def _sym(name: str, target: str) -> Member:
    ti = tarfile.TarInfo(name)
    ti.type = tarfile.SYMTYPE
    ti.linkname = target
    return ti, None


def _hard(name: str, target: str) -> Member:
    ti = tarfile.TarInfo(name)
    ti.type = tarfile.LNKTYPE
    ti.linkname = target
    return ti, None


def make_tar(
    path: Path, members: list[Member], mode: str = "w", fmt: int = tarfile.PAX_FORMAT
) -> Path:
    with tarfile.open(path, mode, format=fmt) as tf:  # type: ignore[call-overload]
        for ti, data in members:
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    return path


def assert_inside(dest: Path) -> None:
    """Every extracted path, symlinks followed (through chains), stays in ``dest``."""
    real = os.path.realpath(dest)
    for dirpath, dirnames, filenames in os.walk(dest):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            resolved = os.path.realpath(path)
            assert os.path.commonpath([real, resolved]) == real, (path, resolved)


@pytest.fixture
def seedbox(tmp_path: Path) -> dict[str, Path]:
    box = {"src": tmp_path / "src", "outside": tmp_path / "outside", "root": tmp_path}
    for path in box.values():
        path.mkdir(exist_ok=True)
    (box["outside"] / "keep.txt").write_text("original")
    return box


def fresh_dest(box: dict[str, Path]) -> Path:
    return Path(tempfile.mkdtemp(dir=box["root"], prefix="dest-"))


# Cases the corpus in tests/test_workspace_seed.py does not have. Each is either
# refused with its rule, or kept entirely inside the workspace.
EXTRA_HOSTILE: list[tuple[str, list[Member], str | None]] = [
    (
        "symlink-chain-escape",
        [_sym("a", "b"), _sym("b", "c"), _sym("c", "../..")],
        "symlink_escape",
    ),
    (
        "symlink-chain-through-dirs",
        [_dir("d"), _sym("d/l1", "../e"), _dir("e"), _sym("e/l2", "../../x")],
        "symlink_escape",
    ),
    ("symlink-loop", [_sym("a", "b"), _sym("b", "a")], None),  # ELOOP inside: harmless
    ("symlink-self", [_sym("a", "a")], None),
    ("hardlink-to-symlink", [_dir("d"), _sym("s", "d"), _hard("h", "s")], "hardlink_target"),
    (
        "hardlink-to-escaping-chain",
        [_sym("s", "../outside/keep.txt"), _hard("h", "s")],
        "symlink_escape",
    ),
    ("case-variants", [_file("README"), _file("readme"), _file("ReadMe")], None),
    ("unicode-lookalike-dots", [_file("\u2024\u2024/x"), _file("\uff0e\uff0e/y")], None),
    ("right-to-left-override", [_file("evil\u202etxt.exe")], None),
    ("newline-in-name", [_file("a\nb")], None),
    ("backslashes-are-plain", [_file("..\\..\\evil")], None),
    ("dots-only-names", [_file("..."), _file(".. ")], None),
    ("dotdot-at-the-end", [_dir("a"), _file("a/..")], "parent_escape"),
    ("dot-the-root-as-a-file", [_file(".")], "type_conflict"),
    ("component-over-255-bytes", [_file("n" * 256)], "invalid_name"),
    ("path-over-4096-bytes", [_file("/".join(["d" * 200] * 25))], "invalid_name"),
    ("long-names-within-limits", [_file("n" * 255), _file("/".join(["p" * 100] * 10))], None),
]


@pytest.mark.parametrize(
    ("members", "rule"), [pytest.param(m, r, id=i) for i, m, r in EXTRA_HOSTILE]
)
def test_extra_hostile_archives(
    seedbox: dict[str, Path], members: list[Member], rule: str | None
) -> None:
    archive = make_tar(seedbox["src"] / "t.tar", members)
    dest = fresh_dest(seedbox)
    if rule is None:
        result = seed_tree(dest, archive)
        assert result.entry_count >= len([m for m in members if m[0].name not in ("", ".")])
        assert_inside(dest)
    else:
        with pytest.raises(UnsafeSeedError) as caught:
            seed_tree(dest, archive)
        assert caught.value.details["rule"] == rule, caught.value
    assert (seedbox["outside"] / "keep.txt").read_text() == "original"
    assert sorted(p.name for p in seedbox["outside"].iterdir()) == ["keep.txt"]


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_many_small_files_and_the_entry_cap(seedbox: dict[str, Path], fmt: int) -> None:
    members = [_dir("d")] + [_file(f"d/f{i:05d}", str(i).encode()) for i in range(3000)]
    archive = make_tar(seedbox["src"] / "many.tar.gz", members, "w:gz", fmt)
    dest = fresh_dest(seedbox)
    assert seed_tree(dest, archive).entry_count == 3001
    assert (dest / "d" / "f02999").read_bytes() == b"2999"
    with pytest.raises(UnsafeSeedError) as caught:
        seed_tree(fresh_dest(seedbox), archive, seed_limits=SeedLimits(max_entries=1000))
    assert caught.value.details["rule"] == "too_many_entries"


@pytest.mark.skipif(shutil.which("tar") is None, reason="needs GNU tar to write sparse members")
@pytest.mark.parametrize("fmt", ["gnu", "pax"])
def test_sparse_members(seedbox: dict[str, Path], fmt: str) -> None:
    """Sparse members (GNU 'S' headers, pax GNU.sparse.*) extract to the right bytes;
    their full size counts against the caps, checked before any data is written."""
    work = seedbox["src"]
    sparse = work / "sparse"
    with sparse.open("wb") as fh:
        fh.truncate(8 << 20)
        fh.seek(3 << 20)
        fh.write(b"middle")
    archive = work / f"sparse-{fmt}.tar"
    subprocess.run(
        ["tar", "-S", f"--format={fmt}", "-cf", str(archive), "-C", str(work), "sparse"],
        check=True,
    )
    assert archive.stat().st_size < 64 * 1024  # the archive really is sparse
    dest = fresh_dest(seedbox)
    seed_tree(dest, archive)
    assert (
        hashlib.sha256((dest / "sparse").read_bytes()).digest()
        == hashlib.sha256(sparse.read_bytes()).digest()
    )
    dest = fresh_dest(seedbox)
    with pytest.raises(UnsafeSeedError) as caught:
        seed_tree(dest, archive, seed_limits=SeedLimits(max_file_bytes=1 << 20))
    assert caught.value.details["rule"] == "file_size"
    assert list(dest.iterdir()) == []


COMPRESSIONS = [("w:gz", ".tar.gz"), ("w:bz2", ".tar.bz2"), ("w:xz", ".tar.xz")]


def _compressed(seedbox: dict[str, Path], mode: str, suffix: str) -> tuple[Path, bytes]:
    payload = hashlib.sha256(b"seed").digest() * 1000  # 32 KB, some of it compressible
    archive = make_tar(
        seedbox["src"] / f"good{suffix}", [_dir("d"), _file("d/data", payload)], mode
    )
    return archive, payload


@pytest.mark.parametrize(("mode", "suffix"), COMPRESSIONS, ids=[s for _, s in COMPRESSIONS])
@pytest.mark.parametrize(
    "damage",
    ["cut-in-half", "cut-last-byte", "cut-last-8-bytes", "flip-every-64th-byte", "garbage-after"],
)
def test_damaged_compressed_streams_are_refused(
    seedbox: dict[str, Path], mode: str, suffix: str, damage: str
) -> None:
    archive, payload = _compressed(seedbox, mode, suffix)
    data = archive.read_bytes()
    variants: list[bytes] = []
    if damage == "cut-in-half":
        variants = [data[: len(data) // 2]]
    elif damage == "cut-last-byte":
        variants = [data[:-1]]
    elif damage == "cut-last-8-bytes":
        variants = [data[:-8]]
    elif damage == "flip-every-64th-byte":
        variants = [
            data[:i] + bytes([data[i] ^ 0x10]) + data[i + 1 :] for i in range(16, len(data), 64)
        ]
    else:
        variants = [data + b"trailing garbage, not another stream"]
    damaged = seedbox["src"] / f"damaged{suffix}"
    for variant in variants:
        damaged.write_bytes(variant)
        dest = fresh_dest(seedbox)
        try:
            seed_tree(dest, damaged)
        except UnsafeSeedError as exc:
            assert exc.details.get("rule"), exc
            continue
        # Never accepted with different content: a damaged stream either fails its
        # checks or (a flip in a header field tar ignores) yields the same files.
        assert (dest / "d" / "data").read_bytes() == payload, f"corrupt content accepted: {damage}"


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    which=st.sampled_from(["tar", *[s for _, s in COMPRESSIONS]]),
    flips=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(1, 255)), max_size=4),
    cut=st.one_of(st.none(), st.integers(0, 1 << 20)),
    insert=st.one_of(st.none(), st.tuples(st.integers(0, 1 << 20), st.binary(max_size=16))),
)
def test_mutated_archives_never_escape(
    seedbox: dict[str, Path],
    which: str,
    flips: list[tuple[int, int]],
    cut: int | None,
    insert: tuple[int, bytes] | None,
) -> None:
    members = [
        _dir("d"),
        _file("d/a", b"alpha" * 50),
        _sym("d/l", "a"),
        _hard("d/h", "d/a"),
        _file("top", b"top"),
        _sym("up", "d/../top"),
    ]
    modes = {"tar": "w", **{s: m for m, s in COMPRESSIONS}}
    base = seedbox["src"] / f"base{which}"
    if not base.exists():
        make_tar(base, members, modes[which])
    data = bytearray(base.read_bytes())
    for pos, xor in flips:
        data[pos % len(data)] ^= xor
    if insert is not None:
        pos, extra = insert
        data[pos % (len(data) + 1) : pos % (len(data) + 1)] = extra
    if cut is not None:
        del data[cut % (len(data) + 1) :]
    mutated = seedbox["src"] / f"mutated{which}"
    mutated.write_bytes(bytes(data))
    dest = fresh_dest(seedbox)
    try:
        seed_tree(dest, mutated)
    except PyroError as exc:  # refused: a rule, a message, nothing else
        assert exc.message
    else:
        assert_inside(dest)
    shutil.rmtree(dest)
    assert (seedbox["outside"] / "keep.txt").read_text() == "original"
    assert sorted(p.name for p in seedbox["outside"].iterdir()) == ["keep.txt"]


@pytest.mark.vm
def test_special_source_paths_are_refused_without_reading(
    sandbox: dict[str, Path], vm_environment: str
) -> None:
    fifo = sandbox["cwd"] / "fifo"
    os.mkfifo(fifo)
    for source in ("/dev/null", "/dev/zero", str(fifo)):
        with pytest.raises(PyroError, match="neither a directory nor a regular file"):
            Pyro(reap=False).create_task(vm_environment, source_path=source)
    assert list((sandbox["state"] / "tasks").glob("task-*")) == []
    fifo.unlink()


@pytest.mark.vm
@pytest.mark.parametrize(
    "members",
    [
        pytest.param([_file("ok"), _sym("c", "../.."), _file("later")], id="escape-after-files"),
        pytest.param([_file(f"f{i}") for i in range(50)] + [_file("/abs")], id="absolute-last"),
        pytest.param([_file("a"), _file("n" * 300)], id="name-too-long"),
    ],
)
def test_a_rejected_seed_leaves_nothing_behind(
    vm_environment: str, state_dir: Path, seedbox: dict[str, Path], members: list[Member]
) -> None:
    """Through the SDK: the task is refused before any VM exists, and its folder, its
    staging tree and its lock are all gone."""
    archive = make_tar(seedbox["src"] / "bad.tar.gz", members, "w:gz")
    pyro = Pyro(state_dir=state_dir)
    with pytest.raises(UnsafeSeedError):
        pyro.create_task(vm_environment, source_path=archive)
    assert pyro.list_tasks() == [] and pyro.list_vms() == []
    leftovers = [p for p in state_dir.rglob("*") if p.name.startswith(("task-", ".task-", "vm-"))]
    assert leftovers == []
    assert (seedbox["outside"] / "keep.txt").read_text() == "original"


def test_fuzz_counts_of_the_protocol_decoder() -> None:
    """The decoder's own fuzz (tests/test_protocol.py) runs several thousand cases."""
    source = (Path(__file__).parent / "test_protocol.py").read_text()
    counts = [int(n) for n in re.findall(r"max_examples=(\d+)", source)]
    assert sum(counts) >= 5000, counts


def test_decoder_state_after_garbage_is_sticky() -> None:
    """Once a stream broke there is no resynchronisation: later valid frames fail too."""
    decoder = p.FrameDecoder(p.GUEST_TO_HOST)
    with contextlib.suppress(PyroError):
        decoder.feed(b"garbage!" * 3)
    with pytest.raises(PyroError):
        decoder.feed(p.encode(1, p.Pong()))
