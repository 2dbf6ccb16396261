"""The API docs at /schema in a real browser (Debian's chromium, driven by Playwright), on a
machine with no internet: every request outside the gateway is blocked and recorded."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import pytest

from gateway_proc import GatewayProcess
from test_dashboard import CHROMIUM, CHROMIUM_ARGS, LAPTOP

playwright_api = pytest.importorskip("playwright.sync_api")

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (./dev test installs it)")


@pytest.fixture(scope="module")
def gateway(tmp_path_factory) -> GatewayProcess:
    gw = GatewayProcess(tmp_path_factory.mktemp("schema") / "data").start()
    yield gw
    gw.stop()


def test_schema_page_renders_every_operation_without_internet(gateway):
    gateway_host = urlsplit(gateway.url).netloc
    outside: list[str] = []
    errors: list[str] = []

    def offline(route) -> None:
        # What a machine without internet does to a request for anything else: it fails.
        if urlsplit(route.request.url).netloc == gateway_host:
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort("internetdisconnected")

    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            # No key and no session: the docs are open, and so must be the files they load.
            context = browser.new_context(viewport=LAPTOP)
            context.route("**/*", offline)
            page = context.new_page()
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(gateway.url + "/schema")
            operations = page.locator(".opblock-summary-path")
            try:
                operations.first.wait_for(timeout=30_000)
            except playwright_api.TimeoutError:
                pass  # a blank page: the assertions below say why
            shown = {operations.nth(i).get_attribute("data-path") for i in range(operations.count())}
            authorize = page.get_by_role("button", name="Authorize").count()
        finally:
            browser.close()

    assert not outside, f"/schema asked for files outside the gateway: {outside}"
    assert not errors, f"JavaScript errors on /schema: {errors}"
    schema = gateway.client(key=None).get("/schema/openapi.json").json()
    assert shown == set(schema["paths"]), "Swagger UI lists other operations than the schema has"
    assert authorize == 1, "no Authorize button: the docs cannot send a key"
