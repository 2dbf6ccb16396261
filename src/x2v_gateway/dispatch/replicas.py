"""Gateway replicas that share the work without a leader: leases, take-overs, changes seen.

Any number of gateway processes may run on one store (one SQLite file on one machine, or
PostgreSQL). None leads; each does everything:

- Each has an id (X2V_REPLICA_ID, default `hostname:pid`) and a lease row in the store that it
  renews every HEARTBEAT seconds for X2V_REPLICA_LEASE seconds.
- Each plans dispatch rounds over the whole queue. A job is claimed for a node in the store, and
  the node's slot with it, in one atomic step (`JobStore.claim(slots=...)`): two replicas may
  both plan the same job or the last free slot, and only one claim succeeds. No node ever holds
  more jobs than its slots, whichever replicas sent them.
- A claimed job names its replica, which alone submits it, follows it and collects its video.
  Each heartbeat also takes over the jobs of replicas whose lease ran out (or whose process on
  this host is gone): the taker's follow loops then resolve each one against the node's task
  list, exactly as a restarted gateway does, so a job whose submission was in flight when its
  replica died is sent again only if the node never got it.
- Changes made by other replicas reach this one's live pages, `?wait=` and dispatch loop through
  `changes_since`, polled every WATCH_INTERVAL while another replica is alive.

A replica whose lease was taken over while it still ran (stalled longer than the lease) stops:
it no longer owns the jobs it was sending, and carrying on could send one twice. Its service
manager starts it again, as a new replica.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable

from ..store import Job
from .state import Context

log = logging.getLogger("x2v_gateway.dispatch")

# Seconds between lease renewals (each also looks for dead replicas). A lease of 6 s renewed
# every second survives five missed renewals, and moves a dead replica's jobs within 7 s.
HEARTBEAT = 1.0
# Seconds between looks for changes made by other replicas ("within a second" for live pages).
WATCH_INTERVAL = 0.25
# A process of this host that no longer exists is dead, but its last request to a node may
# still be in that node's hands (a body read, a task about to be made): its jobs are taken over
# only once it has been silent this long.
GONE_AFTER = 2.0


def default_replica_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def gone_on_this_host(rows: list[dict], me: str, lease: float, now: float) -> list[str]:
    """The replicas that ran on this host (default ids, `hostname:pid`) whose process is gone
    and that have not renewed their lease for GONE_AFTER seconds: a restarted single gateway
    takes its predecessor's jobs over at once instead of waiting for the lease to run out."""
    host = socket.gethostname()
    gone = []
    for row in rows:
        name, _, pid = row["id"].rpartition(":")
        if row["id"] == me or name != host or not pid.isdigit() or int(pid) == os.getpid():
            continue
        if row["expires_at"] - lease > now - GONE_AFTER:
            continue  # renewed a moment ago
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            gone.append(row["id"])
        except PermissionError:
            pass  # a process of another user holds that pid now: not ours to judge
    return gone


def _stop_this_process() -> None:
    # SIGTERM: the server shuts down as it does for its service manager, which starts it again.
    os.kill(os.getpid(), signal.SIGTERM)


class Replicas:
    """This replica's lease, its take-overs, and the changes made by the others."""

    def __init__(
        self, ctx: Context, lease: float, send_cancel: Callable[[Job], Awaitable[None]],
        on_lost: Callable[[], None] = _stop_this_process,
    ) -> None:
        self.ctx = ctx
        self.lease = lease
        self.send_cancel = send_cancel
        self.on_lost = on_lost
        self.others = 0  # other replicas with a lease, at the last heartbeat
        # The change log's position taken by the last heartbeat that found this replica alone
        # (before it read the leases): where the watch starts once another replica appears.
        self.alone_mark: int | None = None
        self.lost = False

    @property
    def id(self) -> str:
        return self.ctx.replica

    async def start(self) -> None:
        """Join, and take over at once what dead replicas (a previous life of this gateway
        among them) left in flight, before the follow loops start."""
        await self.ctx.store.join(self.id, self.lease)
        await self.beat()
        self.ctx.spawn(self._heartbeats())
        self.ctx.spawn(self._watch())

    async def stop(self) -> None:
        if not self.lost:
            await self.ctx.store.leave(self.id, GONE_AFTER)

    async def beat(self) -> None:
        ctx = self.ctx
        # Taken before the leases are read: a replica this beat does not see yet makes all its
        # changes after this point. A position taken only once it is seen would skip those it
        # made before (a cancel sent through a replica that had just started was missed so).
        mark, _ = await ctx.store.changes_since(None)
        rows = await ctx.store.replicas()
        gone = gone_on_this_host(rows, self.id, self.lease, time.time())
        taken = await ctx.store.heartbeat(self.id, self.lease, gone)
        if taken is None:
            self.lost = True
            ctx.running = False  # sends nothing more: its jobs are another replica's now
            log.critical("replica %s: its lease was taken over by another replica; stopping", self.id)
            self.on_lost()
            return
        now = time.time()
        self.others = sum(1 for r in rows if r["id"] != self.id and r["expires_at"] >= now and r["id"] not in gone)
        if self.others == 0:
            self.alone_mark = mark
        if taken:
            log.warning("replica %s took over %d job(s) of replicas that stopped", self.id, len(taken))
            ctx.metrics.jobs_taken_over.inc(len(taken))
            for job_id in taken:
                ctx.notifier.changed(job_id)
            for state in ctx.states.values():
                state.plan.poke.set()  # their follow loops look at the jobs now theirs

    async def _heartbeats(self) -> None:
        while self.ctx.running:
            await asyncio.sleep(HEARTBEAT)
            try:
                await self.beat()
            except Exception:
                log.exception("replica %s: heartbeat failed; trying again", self.id)

    async def _watch(self) -> None:
        """Tell this replica's listeners (live pages, `?wait=`, the dispatch loop) of the job
        changes other replicas made. Alone, it skips the read: its own changes it already told."""
        ctx = self.ctx
        cursor: int | None = None
        while ctx.running:
            await asyncio.sleep(WATCH_INTERVAL)
            if self.others <= 0:
                cursor = None
                continue
            if cursor is None:
                cursor = self.alone_mark  # None (others from the start): a position taken now
            try:
                cursor, changed = await ctx.store.changes_since(cursor)
            except Exception:
                log.exception("replica %s: reading changes failed; trying again", self.id)
                continue
            for job_id in changed:
                ctx.notifier.changed(job_id)
            if changed:
                ctx.wake()  # a job queued, or a slot freed, by another replica
                await self._deliver_cancels(set(changed))

    async def _deliver_cancels(self, changed: set[str]) -> None:
        """A job of this replica's cancelled through another: its stop request goes out now,
        not at the follow loop's next round (seconds away while its node runs a long job)."""
        for job in await self.ctx.store.cancel_pending():
            if job.id in changed and job.replica == self.id:
                self.ctx.spawn(self.send_cancel(job))
