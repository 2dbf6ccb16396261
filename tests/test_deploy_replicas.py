"""deploy/compose.replicas.yaml holds together: three gateway replicas, PostgreSQL, SeaweedFS S3
and a load balancer (Caddy), checked as tests/test_deploy_files.py checks the other compose files
(no Docker engine runs in CI): every name is declared, only the load balancer is reachable from
outside, the store and the bucket only from the replicas, and the replicas are alike."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from test_deploy_files import (
    REPO,
    VAR_RE,
    _build_context,
    _documented_variables,
    _environment,
    _load,
    _mounts,
    _service_networks,
    _services,
)

COMPOSE = REPO / "deploy" / "compose.replicas.yaml"
CADDYFILE = REPO / "deploy" / "Caddyfile"
GATEWAY_PORT = "8000"


def _compose() -> dict:
    return _load(COMPOSE)


def _replicas() -> dict[str, dict]:
    """Services built from the repository's Dockerfile: the gateway replicas."""
    return {name: s for name, s in _services(_compose()).items() if _build_context(COMPOSE, s) == REPO}


def test_every_variable_is_documented_and_none_silently_empty() -> None:
    text = COMPOSE.read_text()
    assert not re.findall(r"(?<!\$)\$(?![{$])[A-Za-z_]\w*", text), "use ${VAR:-default}, not a bare $VAR"
    documented = _documented_variables()
    for name, op, _ in VAR_RE.findall(text):
        assert name in documented, f"${{{name}}} is not in deploy/compose.env.example"
        assert op in (":-", ":?"), f"${{{name}}} needs :-default or :?message"


def test_names_it_uses_are_declared_and_used() -> None:
    compose = _compose()
    services = _services(compose)
    volumes, networks, configs = (set(compose.get(k) or {}) for k in ("volumes", "networks", "configs"))
    used_volumes, used_networks, used_configs = set(), set(), set()
    for name, service in services.items():
        for mount in _mounts(service):
            assert mount["type"] == "volume" and mount["source"] in volumes, f"{name}: {mount}"
            used_volumes.add(mount["source"])
        used_networks.update(_service_networks(service))
        used_configs.update(c["source"] if isinstance(c, dict) else c for c in service.get("configs") or [])
        for other in service.get("depends_on") or []:
            assert other in services, f"{name} depends on {other}, which does not exist"
    assert (volumes, networks, configs) == (used_volumes, used_networks, used_configs)
    assert (COMPOSE.parent / compose["configs"]["caddyfile"]["file"]).resolve() == CADDYFILE


def test_three_alike_replicas_share_the_store_and_the_bucket_but_not_a_disk() -> None:
    replicas = _replicas()
    assert len(replicas) == 3
    environments = [_environment(s) for s in replicas.values()]
    # Each its own name, stable across its restarts: its jobs in flight are its own to take back.
    assert sorted(env.pop("X2V_REPLICA_ID") for env in environments) == sorted(replicas)
    assert all(env == environments[0] for env in environments), "the replicas must be configured alike"
    env = environments[0]
    assert (env["X2V_HOST"], env["X2V_PORT"]) == ("0.0.0.0", GATEWAY_PORT)
    assert re.search(r"@postgres:5432/", env["X2V_DATABASE_URL"])
    assert env["X2V_BLOBS"].startswith("s3://")
    endpoint = urlsplit(env["X2V_S3_ENDPOINT"])
    seaweedfs = _services(_compose())["seaweedfs"]
    assert endpoint.hostname == "seaweedfs" and f"-s3.port={endpoint.port}" in seaweedfs["command"]
    # Each keeps its own temporary files: a shared data directory would be one disk again.
    data = [m["source"] for s in replicas.values() for m in _mounts(s) if m["target"] == env["X2V_DATA_DIR"]]
    assert len(set(data)) == 3


def test_only_the_load_balancer_is_reachable_from_outside() -> None:
    compose = _compose()
    services = _services(compose)
    assert {name for name, s in services.items() if s.get("ports")} == {"lb"}
    (published,) = services["lb"]["ports"]
    assert str(published).rsplit(":", 1)[-1] == GATEWAY_PORT
    networks = compose["networks"]
    for name in ("postgres", "seaweedfs"):
        for network in _service_networks(services[name]):
            assert (networks[network] or {}).get("internal") is True, f"{name} must be on an internal network only"
            members = {n for n, s in services.items() if network in _service_networks(s)}
            assert members <= {"postgres", "seaweedfs", *_replicas()}, f"{network} reaches {members}"
    for name in _replicas():
        # A replica reaches the nodes (other machines): it needs a network with a way out.
        assert any(not (networks[n] or {}).get("internal") for n in _service_networks(services[name]))


def test_the_load_balancer_sends_to_every_replica_and_checks_its_health() -> None:
    caddyfile = CADDYFILE.read_text()
    (upstreams,) = re.findall(r"reverse_proxy\s+([^{]+)\{", caddyfile)
    assert set(upstreams.split()) == {f"{name}:{GATEWAY_PORT}" for name in _replicas()}
    assert re.search(r"health_uri\s+/healthz", caddyfile)
    # The dashboard's live updates are server-sent events: buffered, they would arrive late.
    assert re.search(r"flush_interval\s+-1", caddyfile)


def test_the_bucket_accepts_the_key_pair_the_replicas_use() -> None:
    compose = _compose()
    identities = compose["configs"]["s3-identities"]["content"]
    env = _environment(next(iter(_replicas().values())))
    for name in ("X2V_S3_ACCESS_KEY_ID", "X2V_S3_SECRET_ACCESS_KEY"):
        assert VAR_RE.fullmatch(env[name])[1] == name
        assert f"${{{name}:?" in identities


def test_pulled_images_are_pinned_to_a_version() -> None:
    for name, service in _services(_compose()).items():
        if name in _replicas():
            continue
        image = service["image"]
        tag = image.rpartition(":")[2] if ":" in image else ""
        assert tag and tag != "latest" and re.match(r"\d", tag), f"{name}: pin {image} to a version"


def test_deploy_doc_walks_through_it() -> None:
    doc = (REPO / "docs" / "deploy.md").read_text()
    assert "## Outgrowing one machine" in doc
    assert "compose.replicas.yaml" in doc and "X2V_BLOBS" in doc and "copy-blobs" in doc
