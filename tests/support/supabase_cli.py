"""The real Supabase CLI and a PostgreSQL it can reach, for the migration history tests.

The CLI is installed from npm at a pinned version into a cache outside the repository
(~/.cache/sms-orchestrator/supabase-cli/<version>, or $SUPABASE_CLI_CACHE), once per machine; it
needs node and npm and, the first time, the npm registry. `missing_reason()` says why it cannot be
had, for the tests to skip with.

The CLI connects over TCP only (`--db-url postgresql://...`), and the embedded test server
(pgserver) listens on a Unix socket only, so `TcpPostgres` starts a server of its own on 127.0.0.1
and a free port, from pgserver's binaries (the ones every other test uses) or the machine's.
"""

from __future__ import annotations

import fcntl
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg

CLI_VERSION = "2.117.0"
_INSTALL_TIMEOUT = 180


def _cache_dir() -> Path:
    root = os.environ.get("SUPABASE_CLI_CACHE") or str(
        Path.home() / ".cache" / "sms-orchestrator" / "supabase-cli"
    )
    return Path(root) / CLI_VERSION


def cli_path() -> Path:
    return _cache_dir() / "node_modules" / ".bin" / "supabase"


def _version_of(binary: Path) -> str | None:
    try:
        done = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def install() -> str | None:
    """Install the pinned CLI unless it is there; None when it runs, else why it does not."""
    if _version_of(cli_path()) == CLI_VERSION:
        return None
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        return "node and npm are not installed (the Supabase CLI installs from npm)"
    cache = _cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    # Two test processes may install at once: one does, the other waits and finds it there.
    with (cache / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _version_of(cli_path()) != CLI_VERSION:
            try:
                done = subprocess.run(
                    [
                        npm,
                        "install",
                        "--prefix",
                        str(cache),
                        "--no-audit",
                        "--no-fund",
                        "-E",
                        f"supabase@{CLI_VERSION}",
                    ],
                    capture_output=True,
                    text=True,
                    timeout=_INSTALL_TIMEOUT,
                )
            except subprocess.TimeoutExpired:
                return f"npm install supabase@{CLI_VERSION} took over {_INSTALL_TIMEOUT} s"
            if done.returncode != 0:
                tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
                return f"npm install supabase@{CLI_VERSION} failed: {' | '.join(tail)}"
    version = _version_of(cli_path())
    if version != CLI_VERSION:
        return f"{cli_path()} --version answered {version!r}, not {CLI_VERSION}"
    return None


def db_push(workdir: Path, db_url: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`supabase --workdir WORKDIR db push --db-url URL --yes`, README's command (non-interactive)."""
    return subprocess.run(
        [str(cli_path()), "--workdir", str(workdir), "db", "push", "--db-url", db_url, "--yes"],
        capture_output=True,
        text=True,
        timeout=timeout,
        # No telemetry, no update check, no login prompt: a test talks to nothing but its database.
        env={**os.environ, "DO_NOT_TRACK": "1", "SUPABASE_TELEMETRY_DISABLED": "1"},
        stdin=subprocess.DEVNULL,
    )


def _postgres_bin() -> Path | None:
    candidates: list[Path] = []
    try:
        from pgserver._commands import POSTGRES_BIN_PATH

        candidates.append(Path(POSTGRES_BIN_PATH))
    except ImportError:
        pass
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    for directory in candidates:
        if (directory / "initdb").exists() and (directory / "pg_ctl").exists():
            return directory
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class TcpPostgres:
    """A throwaway PostgreSQL on 127.0.0.1, trust authentication, superuser `postgres`. As root
    (PostgreSQL refuses to run as root) it runs as the unprivileged user pgserver uses."""

    def __init__(self) -> None:
        bin_dir = _postgres_bin()
        if bin_dir is None:
            raise RuntimeError("no PostgreSQL binaries (pgserver's or /usr/lib/postgresql/*/bin)")
        self._bin = bin_dir
        self._user: str | None = None
        if os.geteuid() == 0:
            self._user = "pgserver"
            try:
                pwd.getpwnam(self._user)
            except KeyError:
                subprocess.run(["useradd", "-s", "/bin/bash", self._user], check=True, capture_output=True)
        self.datadir = Path(tempfile.mkdtemp(prefix="mq-tcp-pg-"))
        if self._user is not None:
            entry = pwd.getpwnam(self._user)
            os.chown(self.datadir, entry.pw_uid, entry.pw_gid)
        self._run("initdb", "-D", str(self.datadir), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        for _ in range(3):  # the free port may be taken between the probe and the start
            self.port = _free_port()
            options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.datadir}"
            started = self._run(
                "pg_ctl",
                "-D",
                str(self.datadir),
                "-o",
                options,
                "-l",
                str(self.datadir / "log"),
                "-w",
                "start",
                check=False,
            )
            if started.returncode == 0:
                break
        else:
            raise RuntimeError(
                f"the TCP PostgreSQL did not start: {(self.datadir / 'log').read_text()[-2000:]}"
            )

    def restart(self, down_seconds: float = 0.0) -> None:
        """Stop the server (fast shutdown: every session is cut), stay down `down_seconds`, start it
        again on the same port."""
        self._run("pg_ctl", "-D", str(self.datadir), "-m", "fast", "-w", "stop")
        time.sleep(down_seconds)
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.datadir}"
        self._run(
            "pg_ctl", "-D", str(self.datadir), "-o", options, "-l", str(self.datadir / "log"), "-w", "start"
        )

    def _run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self._bin / tool), *args],
            capture_output=True,
            text=True,
            check=check,
            user=self._user,
            timeout=60,
        )

    def url(self, database: str = "postgres") -> str:
        # sslmode=disable: the CLI tries TLS first otherwise, and this server has none.
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}?sslmode=disable"

    def create_database(self, name: str) -> str:
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'create database "{name}"')
        return self.url(name)

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.datadir), "-m", "immediate", "-w", "stop", check=False)
        deadline = time.monotonic() + 10
        while (self.datadir / "postmaster.pid").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        shutil.rmtree(self.datadir, ignore_errors=True)
