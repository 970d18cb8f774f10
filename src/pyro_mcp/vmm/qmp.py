"""A minimal QMP (QEMU Machine Protocol) client: enough for migrate/restore."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

from pyro_mcp.errors import BootError


class QMPClient:
    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(path))
                break
            except OSError as exc:
                sock.close()
                if time.monotonic() > deadline:
                    raise BootError(f"cannot connect to QEMU's QMP socket: {exc}") from exc
                time.sleep(0.005)
        sock.settimeout(timeout)
        self._sock = sock
        self._file = sock.makefile("rwb")
        self._read()  # greeting
        self.execute("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        while True:
            line = self._file.readline()
            if not line:
                raise BootError("QEMU closed its QMP socket")
            msg: dict[str, Any] = json.loads(line)
            if "event" in msg:
                continue
            return msg

    def execute(self, command: str, **arguments: Any) -> Any:
        req: dict[str, Any] = {"execute": command}
        if arguments:
            req["arguments"] = arguments
        self._file.write(json.dumps(req).encode() + b"\n")
        self._file.flush()
        reply = self._read()
        if "error" in reply:
            raise BootError(f"QMP {command} failed: {reply['error'].get('desc', reply['error'])}")
        return reply.get("return")

    def wait_migration(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.execute("query-migrate")
            status = info.get("status") if isinstance(info, dict) else None
            if status == "completed":
                return
            if status in ("failed", "cancelled"):
                raise BootError(f"migration {status}: {info.get('error-desc', '')}")
            time.sleep(0.005)
        raise BootError("migration did not complete in time")

    def close(self) -> None:
        try:
            self._file.close()
            self._sock.close()
        except OSError:
            pass
