"""A throw-away PostgreSQL server for tests marked `postgres`.

The session fixture `postgres_url` initdb's a cluster in a fresh temporary folder, starts
`postgres` on a free port of 127.0.0.1 only (its Unix socket stays in that folder), creates
a database and yields `postgresql+psycopg2://USER@127.0.0.1:PORT/DB`; the server is
stopped and the folder removed at the end of the session. `create_database(url, name)`
adds another database on the same server. `postgres_cluster()` is the same server as a
context manager, for the benchmarks.

The binaries come from $MNIST_TRACK_PG_BINDIR, else `pg_config --bindir`, else the newest
/usr/lib/postgresql/*/bin, else PATH.
PostgreSQL refuses to run as root, so under root the server runs as an unprivileged user:
$MNIST_TRACK_PG_USER, else `postgres` if that user exists, else `nobody`. Authentication
is `trust`, which is safe only because nothing but 127.0.0.1 is listened on.

Missing binaries or driver skip the tests, unless MNIST_TRACK_REQUIRE_POSTGRES=1 is set:
then they fail, so a CI job that is meant to test PostgreSQL cannot pass without it.

Use it from a test module with `pytest_plugins = ["postgres"]`.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

REQUIRE_ENV = "MNIST_TRACK_REQUIRE_POSTGRES"
USER_ENV = "MNIST_TRACK_PG_USER"
BINDIR_ENV = "MNIST_TRACK_PG_BINDIR"
DATABASE = "mnist_track"


def unavailable(reason: str):
    """Skip, or fail when PostgreSQL is required."""
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"PostgreSQL is required ({REQUIRE_ENV}=1) but {reason}", pytrace=False)
    pytest.skip(f"PostgreSQL not available: {reason} (set {REQUIRE_ENV}=1 to fail instead)")


def find_bindir() -> Path | None:
    """The folder with initdb, pg_ctl and postgres."""
    if os.environ.get(BINDIR_ENV):
        folder = Path(os.environ[BINDIR_ENV])
        return folder if has_server_tools(folder) else None
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            output = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
            candidates.append(Path(output))
        except (OSError, subprocess.SubprocessError):
            pass

    def version(path: str) -> tuple[int, ...]:
        number = Path(path).parent.name
        return tuple(int(part) for part in number.split(".") if part.isdigit())

    candidates += [
        Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True)
    ]
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).parent)
    return next((folder for folder in candidates if has_server_tools(folder)), None)


def has_server_tools(folder: Path) -> bool:
    return all((folder / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres"))


def server_user() -> pwd.struct_passwd:
    if os.geteuid() != 0:
        return pwd.getpwuid(os.geteuid())
    names = [os.environ[USER_ENV]] if os.environ.get(USER_ENV) else ["postgres", "nobody"]
    for name in names:
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    unavailable(f"none of the users {names} exists to run the server (we are root)")
    raise AssertionError("unreachable")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PostgresServer:
    """One cluster in `folder`, run as `user` by `bindir`'s binaries."""

    def __init__(self, bindir: Path, user: pwd.struct_passwd, folder: Path) -> None:
        self.bindir, self.user, self.folder = bindir, user, folder
        self.data = folder / "data"
        self.log = folder / "server.log"
        self.port = 0

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """A PostgreSQL tool, as the server's user."""
        as_user = {}
        if os.geteuid() == 0:
            as_user = {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []}
        env = {"PATH": os.environ.get("PATH", ""), "HOME": str(self.folder), "LC_ALL": "C"}
        return subprocess.run(
            [str(self.bindir / args[0]), *args[1:]],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.folder,
            env=env,
            **as_user,
        )

    def initdb(self) -> None:
        result = self.run(
            "initdb",
            "-D", str(self.data),
            "-U", self.user.pw_name,
            "--auth=trust",
            "--encoding=UTF8",
            "--no-sync",
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"initdb failed:\n{result.stdout}\n{result.stderr}")
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": f"'{self.folder}'",
            "max_connections": "100",
            # A test cluster: durability is not needed, speed is.
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
        }
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write("\n# mnist-track tests\n")
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())

    def start(self) -> None:
        errors = []
        for _attempt in range(3):  # the free port may be taken before the server binds it
            self.port = free_port()
            result = self.run(
                "pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60",
                "-o", f"-p {self.port}", "start",
            )  # fmt: skip
            if result.returncode == 0:
                return
            log = self.log.read_text() if self.log.exists() else ""
            errors.append(f"{result.stdout}{result.stderr}\n{log[-2000:]}")
        raise RuntimeError("PostgreSQL did not start:\n" + "\n---\n".join(errors))

    def stop(self) -> None:
        self.run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def url(self, database: str) -> str:
        return f"postgresql+psycopg2://{self.user.pw_name}@127.0.0.1:{self.port}/{database}"


def create_database(url: str, name: str) -> str:
    """A new, empty database on the server of `url`; returns its URL."""
    import psycopg2
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    connection = psycopg2.connect(
        host=parsed.host, port=parsed.port, user=parsed.username, dbname="postgres"
    )
    try:
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
    finally:
        connection.close()
    return parsed.set(database=name).render_as_string(hide_password=False)


def wait_until_accepting(url: str, timeout: float = 30) -> None:
    import psycopg2
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    deadline = time.monotonic() + timeout
    while True:
        try:
            psycopg2.connect(
                host=parsed.host, port=parsed.port, user=parsed.username, dbname="postgres"
            ).close()
            return
        except psycopg2.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


class Unavailable(RuntimeError):
    """No PostgreSQL server binaries or no driver on this machine."""


@contextmanager
def postgres_cluster() -> Iterator[str]:
    """A PostgreSQL server private to the caller, in a fresh temporary folder; yields the
    URL of a fresh database on it and stops the server and removes the folder at the
    end. Raises Unavailable when binaries or driver are missing, RuntimeError when the
    server does not start."""
    bindir = find_bindir()
    if bindir is None:
        raise Unavailable(
            "no initdb, pg_ctl and postgres found (tried $MNIST_TRACK_PG_BINDIR, "
            "pg_config --bindir, /usr/lib/postgresql/*/bin and PATH)"
        )
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        raise Unavailable(
            "the psycopg2 driver is not installed (pip install psycopg2-binary)"
        ) from None
    user = server_user()
    folder = Path(tempfile.mkdtemp(prefix="mnist-track-pg-", dir="/tmp"))
    server = PostgresServer(bindir, user, folder)
    try:
        os.chown(folder, user.pw_uid, user.pw_gid)
        folder.chmod(0o700)
        server.initdb()
        server.start()
        admin_url = server.url("postgres")
        wait_until_accepting(admin_url)
        url = create_database(admin_url, DATABASE)
    except Exception as error:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)
        raise RuntimeError(
            f"cannot start PostgreSQL from {bindir} as {user.pw_name}: {error}"
        ) from error
    try:
        yield url
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """URL of a fresh database on a PostgreSQL server private to this test session."""
    cluster = postgres_cluster()
    try:
        url = cluster.__enter__()
    except Unavailable as error:
        unavailable(str(error))
    except RuntimeError as error:
        pytest.fail(str(error))
    try:
        yield url
    finally:
        cluster.__exit__(None, None, None)
