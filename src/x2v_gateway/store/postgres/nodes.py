"""The node registry in PostgreSQL, and the stray tasks to cancel on nodes when they answer again."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import psycopg

from .connections import PgRows, PostgresThreads, rows, timestamp, tuples


class NodeReads(PgRows):
    """The node registry and stray tasks."""

    def nodes(self) -> list[dict[str, Any]]:
        nodes = rows(self.conn, "SELECT * FROM nodes ORDER BY created_at, name")
        for node in nodes:
            node["tasks"] = json.loads(node["tasks"]) if node["tasks"] else None
        return nodes

    def stray_tasks(self, node: str) -> list[str]:
        found = tuples(self.conn, "SELECT task_id FROM stray_tasks WHERE node = %s ORDER BY created_at", (node,))
        return [task_id for (task_id,) in found]


class NodeWrites(PostgresThreads):
    """Nodes added, changed, drained, removed; stray tasks noted and dropped."""

    async def save_node(
        self, name: str, *, url: str, capacity: int, tasks: Iterable[str] | None, source: str
    ) -> None:
        tasks_json = json.dumps(sorted(tasks)) if tasks is not None else None
        now = timestamp()
        await self._execute(
            "INSERT INTO nodes (name, url, capacity, tasks, drained, removed, source,"
            " created_at, updated_at) VALUES (%s, %s, %s, %s, false, false, %s, %s, %s)"
            " ON CONFLICT (name) DO UPDATE SET url = excluded.url,"
            " capacity = excluded.capacity, tasks = excluded.tasks, removed = false,"
            " source = excluded.source, updated_at = excluded.updated_at",
            (name, url, capacity, tasks_json, source, now, now),
        )

    async def set_node_flags(
        self, name: str, *, drained: bool | None = None, removed: bool | None = None
    ) -> None:
        def write(conn: psycopg.Connection) -> None:
            now = timestamp()
            conn.execute(
                "INSERT INTO nodes (name, source, created_at, updated_at) VALUES (%s, 'api', %s, %s)"
                " ON CONFLICT (name) DO NOTHING",
                (name, now, now),
            )
            conn.execute(
                "UPDATE nodes SET drained = coalesce(%s, drained), removed = coalesce(%s, removed),"
                " updated_at = %s WHERE name = %s",
                (drained, removed, now, name),
            )

        await self._write(write)

    async def delete_node(self, name: str) -> None:
        await self._execute("DELETE FROM nodes WHERE name = %s", (name,))

    async def add_stray(self, node: str, task_id: str, job_id: str) -> None:
        await self._execute(
            "INSERT INTO stray_tasks (node, task_id, job_id, created_at) VALUES (%s, %s, %s, %s)"
            " ON CONFLICT (node, task_id) DO UPDATE SET job_id = excluded.job_id, created_at = excluded.created_at",
            (node, task_id, job_id, timestamp()),
        )

    async def drop_stray(self, node: str, task_id: str) -> None:
        await self._execute("DELETE FROM stray_tasks WHERE node = %s AND task_id = %s", (node, task_id))
