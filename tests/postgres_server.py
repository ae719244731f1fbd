"""A throwaway PostgreSQL cluster for tests: initdb as the ``postgres`` user under a temp dir,
listening on 127.0.0.1 on a free port with its socket in that dir, stopped (and deleted) at the end.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


def find_bin_dir() -> Path | None:
    """Folder of Debian's PostgreSQL server binaries (newest version), or None."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)
    return Path(candidates[0]).parent if candidates else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _as_postgres(args: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Run a server binary as the postgres user (initdb and postgres refuse to run as root)."""
    command = args if os.geteuid() != 0 else ["runuser", "-u", "postgres", "--", *args]
    done = subprocess.run(command, capture_output=True, text=True, **kwargs)  # type: ignore[call-overload]
    if done.returncode != 0:
        said = (done.stderr or done.stdout or "").strip()
        raise RuntimeError(f"{Path(args[0]).name} exited with {done.returncode}: {said}")
    return done


@dataclass
class PostgresServer:
    root: Path
    port: int
    bin_dir: Path

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def create_database(self, name: str) -> str:
        _as_postgres(
            [
                str(self.bin_dir / "createdb"),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                "postgres",
                name,
            ]
        )
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"

    @classmethod
    def start(cls) -> PostgresServer:
        bin_dir = find_bin_dir()
        if bin_dir is None:
            raise RuntimeError(
                "PostgreSQL server binaries not found; install Debian's postgresql package"
            )
        root = Path(tempfile.mkdtemp(prefix="blasphemer-pg-"))
        os.chmod(root, 0o777)
        if os.geteuid() == 0:
            shutil.chown(root, "postgres", "postgres")
        data = root / "data"
        _as_postgres(
            [str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "--no-sync"]
        )
        port = _free_port()
        options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
        _as_postgres(
            [
                str(bin_dir / "pg_ctl"),
                "-D",
                str(data),
                "-o",
                options,
                "-l",
                str(root / "log"),
                "-w",
                "start",
            ]
        )
        server = cls(root=root, port=port, bin_dir=bin_dir)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    return server
            time.sleep(0.1)
        server.stop()
        raise RuntimeError(f"PostgreSQL did not start; see {root / 'log'}")

    def stop(self) -> None:
        with contextlib.suppress(RuntimeError):
            _as_postgres(
                [
                    str(self.bin_dir / "pg_ctl"),
                    "-D",
                    str(self.root / "data"),
                    "-m",
                    "immediate",
                    "stop",
                ]
            )
        shutil.rmtree(self.root, ignore_errors=True)
