"""Settings: parsed from the environment over `.env`, refused with the variable's name."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from x2v_gateway.settings import CLOUD_SETTINGS, SETTINGS, SettingsError, load_settings

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_without_any_setting():
    settings = load_settings({}, env_file=None)
    assert (settings.host, settings.port, settings.data_dir) == ("127.0.0.1", 8000, Path("./data"))
    assert settings.nodes == () and settings.clouds == ()


def test_env_file_is_read_and_environment_wins(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("X2V_PORT=9100\nX2V_POLL_INTERVAL=0.5\n")
    settings = load_settings({"X2V_PORT": "9200"}, env_file=env_file)
    assert settings.port == 9200
    assert settings.poll_interval == 0.5


def test_nodes_named_and_unnamed():
    settings = load_settings(
        {"X2V_NODES": "gpu0=http://10.0.0.5:8000, http://10.0.0.6:8000/"}, env_file=None
    )
    assert [(n.name, n.url) for n in settings.nodes] == [
        ("gpu0", "http://10.0.0.5:8000"), ("node2", "http://10.0.0.6:8000"),
    ]


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("X2V_PORT", "eighty", "X2V_PORT must be a whole number"),
        ("X2V_PORT", "70000", "X2V_PORT must be between 1 and 65535"),
        ("X2V_POLL_INTERVAL", "0", "X2V_POLL_INTERVAL must be between"),
        ("X2V_NODES", "gpu0=ftp://x", "X2V_NODES: 'ftp://x' is not an http(s) URL"),
        ("X2V_NODES", "a=http://x:1,a=http://y:1", "X2V_NODES: node names must be unique"),
        ("X2V_LOG_LEVEL", "loud", "X2V_LOG_LEVEL must be one of"),
        ("LIGHTX2V_BASE_URL", "x2v.light-ai.top", "LIGHTX2V_BASE_URL"),
    ],
)
def test_bad_value_names_the_variable(name, value, says):
    with pytest.raises(SettingsError, match=re.escape(says)):
        load_settings({name: value}, env_file=None)


def test_serve_refuses_to_start_with_a_bad_setting(tmp_path):
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "x2v_gateway.cli", "serve", "--env-file", "/nonexistent"],
        env={"PATH": "/usr/bin:/bin", "X2V_PORT": "eighty", "X2V_DATA_DIR": str(tmp_path)},
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "X2V_PORT must be a whole number" in result.stderr


def test_cloud_token_never_in_repr():
    settings = load_settings({"LIGHTX2V_ACCESS_TOKEN": "secret-token-123"}, env_file=None)
    assert settings.clouds[0].token == "secret-token-123"
    assert "secret-token-123" not in repr(settings)


def test_every_setting_is_documented_in_readme_and_env_example():
    readme = (ROOT / "README.md").read_text()
    example = (ROOT / ".env.example").read_text()
    for name in [*SETTINGS, *CLOUD_SETTINGS]:
        assert f"`{name}`" in readme, f"{name} missing from the README's settings table"
        assert name in example, f"{name} missing from .env.example"


def test_every_route_is_in_the_readme(tmp_path):
    from x2v_gateway.app import create_app

    readme = (ROOT / "README.md").read_text()
    settings = load_settings(
        {"X2V_DATA_DIR": str(tmp_path), "X2V_NODES": "n=http://127.0.0.1:9", "X2V_ADMIN_KEY": "k" * 32},
        env_file=None,
    )
    app = create_app(settings)
    missing = []
    for route in app.routes:
        if route.path.startswith(("/schema/", "/static/")):
            continue  # the API docs' own files, and static files
        # `{job_id:str}` in the app is `{id}` or `{job_id}` in the README: any name will do.
        pattern = r"\{[^}]+\}".join(map(re.escape, re.split(r"\{[^}]*\}", route.path)))
        if not re.search(pattern + r"[`?]", readme):
            missing.append(route.path)
    assert not missing, f"routes missing from the README: {missing}"
