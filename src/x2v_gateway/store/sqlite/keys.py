"""API keys, dashboard sessions, daily quotas and the audit log in SQLite."""

from __future__ import annotations

import sqlite3
from typing import Any

from ..records import AdminKeyNeeded, KeyNameTaken
from .connections import AFTER_NEWEST, Rows, SqliteThreads, timestamp


class KeyReads(Rows):
    """Keys, sessions, quotas used, the audit log."""

    def key_by_hash(self, key_hash: str) -> dict[str, Any] | None:
        row = self.conn.execute("SELECT * FROM api_keys WHERE key_hash = ?", (key_hash,)).fetchone()
        return key_row(row) if row else None

    def key(self, key_id: str) -> dict[str, Any] | None:
        row = self.conn.execute("SELECT * FROM api_keys WHERE id = ?", (key_id,)).fetchone()
        return key_row(row) if row else None

    def keys(self) -> list[dict[str, Any]]:
        rows = self.conn.execute("SELECT * FROM api_keys ORDER BY created_at").fetchall()
        return [key_row(r) for r in rows]

    def session(self, id_hash: str) -> tuple[dict[str, Any], str, float] | None:
        row = self.conn.execute(
            "SELECT k.*, s.csrf AS session_csrf, s.expires_at AS session_expires_at"
            " FROM sessions s JOIN api_keys k ON k.id = s.key_id"
            " WHERE s.id_hash = ? AND s.expires_at > ? AND k.revoked_at IS NULL",
            (id_hash, timestamp()),
        ).fetchone()
        if row is None:
            return None
        data = dict(row)
        csrf, expires_at = data.pop("session_csrf"), data.pop("session_expires_at")
        return key_row(data), csrf, expires_at

    def jobs_used(self, key_id: str, day: str) -> int:
        row = self.conn.execute(
            "SELECT jobs FROM key_usage WHERE key_id = ? AND day = ?", (key_id, day)
        ).fetchone()
        return row[0] if row else 0

    def concurrency_limits(self) -> dict[str, int]:
        rows = self.conn.execute(
            "SELECT id, max_concurrent FROM api_keys WHERE max_concurrent IS NOT NULL"
            " AND revoked_at IS NULL"
        )
        return dict(rows.fetchall())

    def audit_log(self, limit: int = 100, before_id: int | None = None) -> list[dict[str, Any]]:
        rows = self.conn.execute(
            "SELECT * FROM audit WHERE id < ? ORDER BY id DESC LIMIT ?",
            (AFTER_NEWEST if before_id is None else before_id, limit),
        )
        return [dict(r) for r in rows]


class KeyWrites(SqliteThreads):
    """Keys made and revoked, sessions, quotas counted, audit entries."""

    async def create_key(self, key: dict[str, Any], actor: str) -> dict[str, Any]:
        """Insert a key row (`key` holds every column but the timestamps). Names are unique among
        keys that are not revoked, so `keys revoke NAME` means one key."""

        def write(conn: sqlite3.Connection) -> None:
            taken = conn.execute(
                "SELECT id FROM api_keys WHERE name = ? AND revoked_at IS NULL", (key["name"],)
            ).fetchone()
            if taken:
                raise KeyNameTaken(f"a key named {key['name']!r} exists ({taken['id']}); revoke it"
                                   " first or choose another name")
            conn.execute(
                "INSERT INTO api_keys (id, name, key_hash, prefix, admin, daily_quota,"
                " max_concurrent, rate_per_min, source, created_at, created_by, webhook_url,"
                " webhook_events, webhook_secret)"
                " VALUES (:id, :name, :key_hash, :prefix, :admin, :daily_quota, :max_concurrent,"
                " :rate_per_min, :source, :created_at, :created_by, :webhook_url, :webhook_events,"
                " :webhook_secret)",
                {"webhook_url": None, "webhook_events": None, "webhook_secret": None, **key,
                 "admin": int(key["admin"]), "created_at": timestamp(), "created_by": actor},
            )
            audit(conn, actor, "key.create", key["id"], key_summary(key))

        await self._write(write)
        return await self.read(lambda r: r.key(key["id"]))

    async def revoke_key(
        self, key_id: str, actor: str, *, keep_admin: bool = False
    ) -> dict[str, Any] | None:
        def write(conn: sqlite3.Connection) -> bool:
            now = timestamp()
            if keep_admin:
                row = conn.execute(
                    "SELECT admin, source FROM api_keys WHERE id = ? AND revoked_at IS NULL", (key_id,)
                ).fetchone()
                if row is not None and row["admin"]:
                    if row["source"] == "env":
                        raise AdminKeyNeeded(
                            f"{key_id} is the key in X2V_ADMIN_KEY, which the gateway's operator"
                            " signs in with: to retire it, set a new X2V_ADMIN_KEY and restart (the"
                            " old one then stops working), or run `x2v-gateway keys revoke` on the"
                            " server"
                        )
                    others = conn.execute(
                        "SELECT COUNT(*) FROM api_keys WHERE admin AND revoked_at IS NULL AND id != ?",
                        (key_id,),
                    ).fetchone()[0]
                    if not others:
                        raise AdminKeyNeeded(
                            f"{key_id} is the last working admin key: revoking it would leave nobody"
                            " able to manage keys and nodes. Make another admin key first"
                            ' (POST /api/v1/keys with "admin": true)'
                        )
            cur = conn.execute(
                "UPDATE api_keys SET revoked_at = ?, revoked_by = ? WHERE id = ? AND revoked_at IS NULL",
                (now, actor, key_id),
            )
            if not cur.rowcount:
                return False
            conn.execute("DELETE FROM sessions WHERE key_id = ?", (key_id,))
            name = conn.execute("SELECT name FROM api_keys WHERE id = ?", (key_id,)).fetchone()[0]
            audit(conn, actor, "key.revoke", key_id, f"name={name}")
            return True

        if not await self._write(write):
            return None
        return await self.read(lambda r: r.key(key_id))

    async def create_session(self, id_hash: str, key_id: str, csrf: str, expires_at: float) -> None:
        def write(conn: sqlite3.Connection) -> None:
            now = timestamp()
            conn.execute("DELETE FROM sessions WHERE expires_at < ?", (now,))
            conn.execute(
                "INSERT INTO sessions (id_hash, key_id, csrf, created_at, expires_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (id_hash, key_id, csrf, now, expires_at),
            )

        await self._write(write)

    async def delete_session(self, id_hash: str) -> None:
        await self._execute("DELETE FROM sessions WHERE id_hash = ?", (id_hash,))

    async def reserve_jobs(self, key_id: str, day: str, n: int, quota: int | None) -> int | None:
        def write(conn: sqlite3.Connection) -> int | None:
            row = conn.execute(
                "SELECT jobs FROM key_usage WHERE key_id = ? AND day = ?", (key_id, day)
            ).fetchone()
            used = row[0] if row else 0
            if quota is not None and used + n > quota:
                return None
            conn.execute(
                "INSERT INTO key_usage (key_id, day, jobs) VALUES (?, ?, ?) ON CONFLICT"
                " (key_id, day) DO UPDATE SET jobs = jobs + excluded.jobs",
                (key_id, day, n),
            )
            return used + n

        return await self._write(write)

    async def release_jobs(self, key_id: str, day: str, n: int) -> None:
        await self._execute(
            "UPDATE key_usage SET jobs = max(0, jobs - ?) WHERE key_id = ? AND day = ?",
            (n, key_id, day),
        )

    async def record_audit(self, actor: str, action: str, target: str, detail: str = "") -> None:
        def write(conn: sqlite3.Connection) -> None:
            audit(conn, actor, action, target, detail)

        await self._write(write)


def key_row(row: Any) -> dict[str, Any]:
    data = dict(row)
    data["admin"] = bool(data["admin"])
    # A key's webhook secrets never leave the store in its row (only `webhook_secrets` reads
    # them, to sign): a row printed, logged or shown cannot hold one.
    data["has_webhook_secret"] = bool(data.pop("webhook_secret", None))
    data.pop("webhook_secret_previous", None)
    return data


def key_summary(key: dict[str, Any]) -> str:
    """A key's settings for the audit log: never its hash, never the key."""
    parts = [f"name={key['name']}", f"admin={bool(key['admin'])}"]
    for column in ("daily_quota", "max_concurrent", "rate_per_min"):
        if key.get(column) is not None:
            parts.append(f"{column}={key[column]:g}" if isinstance(key[column], float) else f"{column}={key[column]}")
    return " ".join(parts)


def audit(conn: sqlite3.Connection, actor: str, action: str, target: str, detail: str) -> None:
    conn.execute(
        "INSERT INTO audit (at, actor, action, target, detail) VALUES (?, ?, ?, ?, ?)",
        (timestamp(), actor, action, target, detail),
    )
