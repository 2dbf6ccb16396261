"""API keys, dashboard sessions, daily quotas and the audit log in PostgreSQL.

A key's daily quota is one counter row that every replica updates with a conditional upsert, so
two requests on two replicas cannot both take a key's last job of the day.
"""

from __future__ import annotations

from typing import Any

import psycopg

from ..records import AdminKeyNeeded, KeyNameTaken
from ..sqlite.keys import key_row, key_summary
from .connections import AFTER_NEWEST, PgRows, PostgresThreads, changed, one, rows, timestamp, tuples, value

# pg_advisory_xact_lock's key for "making or revoking a key": a name's uniqueness and "never the
# last admin key" are checked and written by one replica at a time.
_KEYS_LOCK = 0x7832_7600_0002


class KeyReads(PgRows):
    """Keys, sessions, quotas used, the audit log."""

    def key_by_hash(self, key_hash: str) -> dict[str, Any] | None:
        row = one(self.conn, "SELECT * FROM api_keys WHERE key_hash = %s", (key_hash,))
        return key_row(row) if row else None

    def key(self, key_id: str) -> dict[str, Any] | None:
        row = one(self.conn, "SELECT * FROM api_keys WHERE id = %s", (key_id,))
        return key_row(row) if row else None

    def keys(self) -> list[dict[str, Any]]:
        return [key_row(r) for r in rows(self.conn, "SELECT * FROM api_keys ORDER BY created_at")]

    def session(self, id_hash: str) -> tuple[dict[str, Any], str, float] | None:
        data = one(
            self.conn,
            "SELECT k.*, s.csrf AS session_csrf, s.expires_at AS session_expires_at"
            " FROM sessions s JOIN api_keys k ON k.id = s.key_id"
            " WHERE s.id_hash = %s AND s.expires_at > %s AND k.revoked_at IS NULL",
            (id_hash, timestamp()),
        )
        if data is None:
            return None
        csrf, expires_at = data.pop("session_csrf"), data.pop("session_expires_at")
        return key_row(data), csrf, expires_at

    def jobs_used(self, key_id: str, day: str) -> int:
        return value(self.conn, "SELECT jobs FROM key_usage WHERE key_id = %s AND day = %s", (key_id, day)) or 0

    def concurrency_limits(self) -> dict[str, int]:
        return dict(tuples(
            self.conn,
            "SELECT id, max_concurrent FROM api_keys WHERE max_concurrent IS NOT NULL AND revoked_at IS NULL",
        ))

    def audit_log(self, limit: int = 100, before_id: int | None = None) -> list[dict[str, Any]]:
        return rows(
            self.conn,
            "SELECT * FROM audit WHERE id < %s ORDER BY id DESC LIMIT %s",
            (AFTER_NEWEST if before_id is None else before_id, limit),
        )


class KeyWrites(PostgresThreads):
    """Keys made and revoked, sessions, quotas counted, audit entries."""

    async def create_key(self, key: dict[str, Any], actor: str) -> dict[str, Any]:
        def write(conn: psycopg.Connection) -> None:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_KEYS_LOCK,))
            taken = value(conn, "SELECT id FROM api_keys WHERE name = %s AND revoked_at IS NULL", (key["name"],))
            if taken:
                raise KeyNameTaken(f"a key named {key['name']!r} exists ({taken}); revoke it"
                                   " first or choose another name")
            conn.execute(
                "INSERT INTO api_keys (id, name, key_hash, prefix, admin, daily_quota,"
                " max_concurrent, rate_per_min, source, created_at, created_by, webhook_url,"
                " webhook_events, webhook_secret)"
                " VALUES (%(id)s, %(name)s, %(key_hash)s, %(prefix)s, %(admin)s, %(daily_quota)s,"
                " %(max_concurrent)s, %(rate_per_min)s, %(source)s, %(created_at)s, %(created_by)s,"
                " %(webhook_url)s, %(webhook_events)s, %(webhook_secret)s)",
                {"webhook_url": None, "webhook_events": None, "webhook_secret": None, **key,
                 "admin": bool(key["admin"]), "created_at": timestamp(), "created_by": actor},
            )
            audit(conn, actor, "key.create", key["id"], key_summary(key))

        await self._write(write)
        return await self.read(lambda r: r.key(key["id"]))

    async def revoke_key(
        self, key_id: str, actor: str, *, keep_admin: bool = False
    ) -> dict[str, Any] | None:
        def write(conn: psycopg.Connection) -> bool:
            now = timestamp()
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_KEYS_LOCK,))
            if keep_admin:
                row = one(conn, "SELECT admin, source FROM api_keys WHERE id = %s AND revoked_at IS NULL", (key_id,))
                if row is not None and row["admin"]:
                    if row["source"] == "env":
                        raise AdminKeyNeeded(
                            f"{key_id} is the key in X2V_ADMIN_KEY, which the gateway's operator"
                            " signs in with: to retire it, set a new X2V_ADMIN_KEY and restart (the"
                            " old one then stops working), or run `x2v-gateway keys revoke` on the"
                            " server"
                        )
                    others = value(
                        conn, "SELECT count(*) FROM api_keys WHERE admin AND revoked_at IS NULL AND id <> %s", (key_id,)
                    )
                    if not others:
                        raise AdminKeyNeeded(
                            f"{key_id} is the last working admin key: revoking it would leave nobody"
                            " able to manage keys and nodes. Make another admin key first"
                            ' (POST /api/v1/keys with "admin": true)'
                        )
            name = value(
                conn,
                "UPDATE api_keys SET revoked_at = %s, revoked_by = %s WHERE id = %s AND revoked_at IS NULL"
                " RETURNING name",
                (now, actor, key_id),
            )
            if name is None:
                return False
            conn.execute("DELETE FROM sessions WHERE key_id = %s", (key_id,))
            audit(conn, actor, "key.revoke", key_id, f"name={name}")
            return True

        if not await self._write(write):
            return None
        return await self.read(lambda r: r.key(key_id))

    async def create_session(self, id_hash: str, key_id: str, csrf: str, expires_at: float) -> None:
        def write(conn: psycopg.Connection) -> None:
            now = timestamp()
            conn.execute("DELETE FROM sessions WHERE expires_at < %s", (now,))
            conn.execute(
                "INSERT INTO sessions (id_hash, key_id, csrf, created_at, expires_at)"
                " VALUES (%s, %s, %s, %s, %s)",
                (id_hash, key_id, csrf, now, expires_at),
            )

        await self._write(write)

    async def delete_session(self, id_hash: str) -> None:
        await self._execute("DELETE FROM sessions WHERE id_hash = %s", (id_hash,))

    async def reserve_jobs(self, key_id: str, day: str, n: int, quota: int | None) -> int | None:
        if quota is not None and n > quota:
            return None
        # Check and count in one statement: the row's lock makes a second replica's upsert wait,
        # then see the new total.
        return await self._write(lambda conn: value(
            conn,
            "INSERT INTO key_usage (key_id, day, jobs) VALUES (%s, %s, %s) ON CONFLICT (key_id, day)"
            " DO UPDATE SET jobs = key_usage.jobs + excluded.jobs"
            " WHERE %s::integer IS NULL OR key_usage.jobs + excluded.jobs <= %s::integer RETURNING jobs",
            (key_id, day, n, quota, quota),
        ))

    async def release_jobs(self, key_id: str, day: str, n: int) -> None:
        await self._execute(
            "UPDATE key_usage SET jobs = greatest(0, jobs - %s) WHERE key_id = %s AND day = %s",
            (n, key_id, day),
        )

    async def record_audit(self, actor: str, action: str, target: str, detail: str = "") -> None:
        await self._write(lambda conn: audit(conn, actor, action, target, detail))

    async def take_request(self, key_id: str, per_minute: float) -> float:
        # One statement: the bucket's row lock orders two replicas' requests of one key, each
        # refilling from the other's time and count.
        capacity = max(1.0, per_minute)
        refill = "least(%(cap)s, b.tokens + greatest(0, %(now)s - b.at) * %(rate)s / 60)"
        tokens, taken = await self._write(lambda conn: conn.execute(
            "INSERT INTO rate_buckets AS b (key_id, tokens, at, taken) VALUES (%(key)s, %(cap)s - 1, %(now)s, true)"
            f" ON CONFLICT (key_id) DO UPDATE SET tokens = {refill} - CASE WHEN {refill} >= 1 THEN 1 ELSE 0 END,"
            f" taken = {refill} >= 1, at = greatest(b.at, %(now)s) RETURNING tokens, taken",
            {"key": key_id, "cap": capacity, "now": timestamp(), "rate": per_minute},
        ).fetchone())
        return 0.0 if taken else (1 - tokens) * 60 / per_minute


def audit(conn: psycopg.Connection, actor: str, action: str, target: str, detail: str) -> None:
    changed(
        conn,
        "INSERT INTO audit (at, actor, action, target, detail) VALUES (%s, %s, %s, %s, %s)",
        (timestamp(), actor, action, target, detail),
    )
