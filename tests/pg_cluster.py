"""A throwaway PostgreSQL cluster for tests: Debian's `postgresql` package, on 127.0.0.1.

    cluster = PostgresCluster().start()     # initdb + pg_ctl, a port from servers.free_port()
    url = cluster.new_database()            # a fresh database, from a migrated template
    cluster.stop()

initdb refuses to run as root: as root, the cluster runs as the `postgres` user the package made
(`runuser`). It runs with fsync off: a test's data need not outlive a power cut, and the
gateway's own SIGKILL tests kill the gateway, not PostgreSQL. `./dev test` installs the package
on a machine without it.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import psycopg

from servers import free_port

USER = "x2v"
TEMPLATE = "x2v_template"


def _bin(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if found is None:
        raise RuntimeError(
            f"PostgreSQL's {name} is not installed: `apt-get install postgresql` (./dev test does it)"
        )
    return found


class PostgresCluster:
    """One PostgreSQL server in a temporary directory, its databases made from a template."""

    def __init__(self) -> None:
        self.port = free_port()
        # Not under pytest's tmp dir: as root that is mode 700, which the postgres user cannot enter.
        self.root = Path(tempfile.mkdtemp(prefix="x2v-pg-"))
        self.data = self.root / "data"
        self._names = itertools.count(1)
        self._as: list[str] = []
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            os.chown(self.root, owner.pw_uid, owner.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]

    @property
    def admin_url(self) -> str:
        return self.url("postgres")

    def url(self, database: str) -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str) -> None:
        subprocess.run([*self._as, *args], check=True, capture_output=True, cwd=self.root)

    def _pg_ctl(self, action: str) -> None:
        options = (
            f"-h 127.0.0.1 -p {self.port} -k {self.root} -c fsync=off -c synchronous_commit=off"
            " -c full_page_writes=off -c max_connections=300 -c shared_buffers=32MB"
        )
        self._run(_bin("pg_ctl"), "-D", str(self.data), "-o", options, "-l", str(self.root / "log"),
                  "-m", "fast", "-w", action)

    def restart(self) -> None:
        """A real restart of the server: every connection to it is cut."""
        self._pg_ctl("restart")

    def start(self) -> PostgresCluster:
        self._run(_bin("initdb"), "-D", str(self.data), "-U", USER, "-A", "trust", "--no-sync",
                  "--locale=C.UTF-8", "-E", "UTF8")
        self._pg_ctl("start")
        # The template holds the gateway's schema: a test's database is a copy (tens of ms),
        # not a fresh run of every migration.
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {TEMPLATE}")
        from x2v_gateway.store.postgres.schema import apply_migrations

        with psycopg.connect(self.url(TEMPLATE), autocommit=True) as conn:
            apply_migrations(conn)
        return self

    def new_database(self, *, empty: bool = False) -> str:
        """The URL of a new database holding the gateway's schema and nothing else (`empty`:
        not even the schema, as a new deployment's)."""
        name = f"test_{next(self._names)}"
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name} TEMPLATE {'template0' if empty else TEMPLATE}")
        return self.url(name)

    def stop(self) -> None:
        subprocess.run([*self._as, _bin("pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"],
                       capture_output=True, cwd=self.root)
        shutil.rmtree(self.root, ignore_errors=True)


def raw_sql(store, sql: str, args: tuple = ()) -> list[tuple]:
    """A statement run straight on `store`'s database, whichever the backend (`?` placeholders):
    for tests that set up what no store method makes (a blob recorded hours ago)."""
    from x2v_gateway.store.postgres import PostgresStore

    if isinstance(store, PostgresStore):
        def run(conn):
            cur = conn.execute(sql.replace("?", "%s"), args)
            return cur.fetchall() if cur.description else []

        return store.write_blocking(run)
    return store._conn().execute(sql, args).fetchall()
