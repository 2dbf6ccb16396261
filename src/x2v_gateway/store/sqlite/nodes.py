"""The node registry in SQLite, and the stray tasks to cancel on nodes when they answer again."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from typing import Any

from .connections import Rows, SqliteThreads, timestamp


class NodeReads(Rows):
    """The node registry and stray tasks."""

    def nodes(self) -> list[dict[str, Any]]:
        """Every row of the node registry, removed ones included."""
        rows = self.conn.execute("SELECT * FROM nodes ORDER BY created_at, name").fetchall()
        nodes = []
        for row in rows:
            node = dict(row)
            node["tasks"] = json.loads(node["tasks"]) if node["tasks"] else None
            node["drained"], node["removed"] = bool(node["drained"]), bool(node["removed"])
            nodes.append(node)
        return nodes

    def stray_tasks(self, node: str) -> list[str]:
        rows = self.conn.execute(
            "SELECT task_id FROM stray_tasks WHERE node = ? ORDER BY created_at", (node,)
        )
        return [task_id for (task_id,) in rows]


class NodeWrites(SqliteThreads):
    """Nodes added, changed, drained, removed; stray tasks noted and dropped."""

    async def save_node(
        self, name: str, *, url: str, capacity: int, tasks: Iterable[str] | None, source: str
    ) -> None:
        tasks_json = json.dumps(sorted(tasks)) if tasks is not None else None
        now = timestamp()
        await self._execute(
            "INSERT INTO nodes (name, url, capacity, tasks, drained, removed, source,"
            " created_at, updated_at) VALUES (?, ?, ?, ?, 0, 0, ?, ?, ?)"
            " ON CONFLICT (name) DO UPDATE SET url = excluded.url,"
            " capacity = excluded.capacity, tasks = excluded.tasks, removed = 0,"
            " source = excluded.source, updated_at = excluded.updated_at",
            (name, url, capacity, tasks_json, source, now, now),
        )

    async def set_node_flags(
        self, name: str, *, drained: bool | None = None, removed: bool | None = None
    ) -> None:
        """Drain/undrain or remove a node. A row is made for an upstream not in the registry
        yet (a cloud account), so that its drained flag outlives a restart too."""

        def write(conn: sqlite3.Connection) -> None:
            now = timestamp()
            conn.execute(
                "INSERT OR IGNORE INTO nodes (name, source, created_at, updated_at)"
                " VALUES (?, 'api', ?, ?)",
                (name, now, now),
            )
            for column, value in (("drained", drained), ("removed", removed)):
                if value is not None:
                    conn.execute(
                        f"UPDATE nodes SET {column} = ?, updated_at = ? WHERE name = ?",
                        (int(value), now, name),
                    )

        await self._write(write)

    async def delete_node(self, name: str) -> None:
        await self._execute("DELETE FROM nodes WHERE name = ?", (name,))

    async def add_stray(self, node: str, task_id: str, job_id: str) -> None:
        await self._execute(
            "INSERT OR REPLACE INTO stray_tasks (node, task_id, job_id, created_at) VALUES (?, ?, ?, ?)",
            (node, task_id, job_id, timestamp()),
        )

    async def drop_stray(self, node: str, task_id: str) -> None:
        await self._execute("DELETE FROM stray_tasks WHERE node = ? AND task_id = ?", (node, task_id))
