"""A throw-away PostgreSQL 15 cluster for tests: initdb in a temp folder, a loopback port,
trust auth, removed afterwards. PostgreSQL refuses to run as root, so as root the server runs
as the ``postgres`` system user (runuser); otherwise as the current user."""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from pers_helpers import free_port

BIN = Path(os.environ.get("ATELIER_POSTGRES_BIN", "/usr/lib/postgresql/15/bin"))


def missing_reason() -> str:
    if not (BIN / "initdb").exists() or not (BIN / "pg_ctl").exists():
        return f"PostgreSQL binaries not found in {BIN} (apt-get install postgresql-15, or set ATELIER_POSTGRES_BIN)"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root without runuser: cannot start PostgreSQL as a non-root user"
    return ""


def _as_postgres(args: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args


@contextlib.contextmanager
def postgres_cluster():
    """Yields a ``postgresql://`` URL of a fresh, running cluster."""
    root = Path(tempfile.mkdtemp(prefix="atelier-pg-"))
    data = root / "data"
    port = free_port()
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    started = False
    try:
        subprocess.run(_as_postgres([str(BIN / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                                     "--no-sync", "-E", "UTF8"]), check=True, capture_output=True)
        subprocess.run(_as_postgres([str(BIN / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w", "-t",
                                     "60", "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1 "
                                                 f"-c fsync=off", "start"]), check=True, capture_output=True)
        started = True
        url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        deadline = time.monotonic() + 30
        while subprocess.run([str(BIN / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)],
                             capture_output=True).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError("PostgreSQL did not accept connections")
            time.sleep(0.2)
        yield url
    finally:
        if started:
            subprocess.run(_as_postgres([str(BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"]),
                           capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
