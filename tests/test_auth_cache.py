"""The cache of who a key or a session is (auth.CallerCache): requests with a known key do not
wait for the store, a revoke still takes effect (at once in this process, within
CALLER_CACHE_SECONDS from another one), and random keys cannot grow it."""

from __future__ import annotations

import asyncio
import secrets
import threading
import time

from gateway_proc import ADMIN_KEY, GatewayProcess, remember_secret
from test_auth import browser, cli, make_key

from x2v_gateway.auth import CALLER_CACHE_SECONDS, Auth, CallerCache, new_key
from x2v_gateway.settings import load_settings
from x2v_gateway.store import JobStore
from x2v_gateway.store.sqlite import READER_THREADS


def _auth(tmp_path, callers: CallerCache | None = None) -> Auth:
    settings = load_settings({"X2V_DATA_DIR": str(tmp_path), "X2V_ADMIN_KEY": ADMIN_KEY}, env_file=None)
    return Auth(settings, JobStore(tmp_path / "gateway.db"), callers=callers)


def test_a_known_key_is_let_in_while_every_store_reader_is_busy(tmp_path):
    """Long reads (a big list page, a dashboard) fill the reader threads; a request with a key
    the gateway saw a moment ago is identified without queueing behind them."""
    auth = _auth(tmp_path)

    async def scenario() -> None:
        await auth.bootstrap()
        assert await auth.from_key(ADMIN_KEY) is not None
        gate = threading.Event()
        busy = [asyncio.ensure_future(auth.store.read(lambda r: gate.wait(30))) for _ in range(READER_THREADS)]
        try:
            who = await asyncio.wait_for(auth.from_key(ADMIN_KEY), timeout=10)
            assert who is not None and who.admin
        finally:
            gate.set()
            await asyncio.gather(*busy)

    try:
        asyncio.run(scenario())
    finally:
        auth.store.close()


def test_random_keys_do_not_grow_the_cache(tmp_path):
    auth = _auth(tmp_path)

    async def scenario() -> None:
        await auth.bootstrap()
        for _ in range(2000):
            assert await auth.from_key(new_key()) is None
            assert await auth.from_session(secrets.token_urlsafe(32)) is None
        assert len(auth.callers) == 0
        assert await auth.from_key(ADMIN_KEY) is not None
        assert len(auth.callers) == 1

    try:
        asyncio.run(scenario())
    finally:
        auth.store.close()


def test_valid_sessions_beyond_the_bound_push_out_the_oldest(tmp_path):
    auth = _auth(tmp_path, CallerCache(size=50))

    async def scenario() -> None:
        await auth.bootstrap()
        cookies = [(await auth.sign_in(ADMIN_KEY))[0] for _ in range(120)]
        for cookie in cookies:
            assert await auth.from_session(cookie) is not None
        assert len(auth.callers) == 50
        # Pushed out is only forgotten, not refused: the store is asked again.
        assert await auth.from_session(cookies[0]) is not None

    try:
        asyncio.run(scenario())
    finally:
        auth.store.close()


def test_an_entry_is_trusted_no_longer_than_its_session_lasts():
    cache = CallerCache(ttl=60)
    who = object()
    cache.put("ended", who, ends_at=time.time() - 1)  # type: ignore[arg-type]
    cache.put("lasting", who, ends_at=time.time() + 600)  # type: ignore[arg-type]
    assert cache.get("ended") is None and cache.get("lasting") is who


def test_a_key_revoked_through_the_api_stops_working_at_once(tmp_path):
    gw = GatewayProcess(tmp_path / "data").start()
    try:
        with gw.client() as admin:
            key = make_key(admin, "revoked-by-api")
            with gw.client(key=key) as client, browser(gw, key) as (page, _):
                me = client.get("/api/v1/me").json()
                assert page.get("/ui/jobs").status_code == 200  # both now cached
                assert admin.delete(f"/api/v1/keys/{me['id']}").status_code == 200
                assert client.get("/api/v1/me").status_code == 401
                assert page.get("/ui/jobs").status_code == 401
    finally:
        gw.stop()


def test_a_key_revoked_by_the_cli_stops_working_within_the_cache_bound(tmp_path):
    """The CLI is another process: this gateway learns of the revoke when its cached entry
    expires, CALLER_CACHE_SECONDS at most after the revoke was written."""
    gw = GatewayProcess(tmp_path / "data").start()
    try:
        made = cli(gw, "create", "--name", "revoked-by-cli")
        key = remember_secret(made.stdout.strip())
        with gw.client(key=key) as client, browser(gw, key) as (page, _):
            assert client.get("/api/v1/me").status_code == 200
            assert page.get("/ui/jobs").status_code == 200
            assert cli(gw, "revoke", "revoked-by-cli").returncode == 0
            time.sleep(CALLER_CACHE_SECONDS)
            assert client.get("/api/v1/me").status_code == 401
            assert page.get("/ui/jobs").status_code == 401
    finally:
        gw.stop()
