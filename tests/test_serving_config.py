"""Serving configuration without a cluster: auth rule, the Serve config file, the app builder's arguments."""
from __future__ import annotations

from pathlib import Path

import pytest

from medhash.serving.app import app_builder, auth_token, is_server_uri
from medhash.serving.cli import read_serve_config
from medhash.serving.config import ServeConfig
from medhash.services.errors import ConfigError

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "serve.yaml"


def test_auth_is_on_off_loopback_and_needs_a_token(monkeypatch):
    monkeypatch.delenv("MEDHASH_API_TOKEN", raising=False)
    cfg = ServeConfig()
    assert auth_token(cfg, "127.0.0.1") is None
    for host in ("0.0.0.0", None):  # None: bound by a Serve config's http_options, unknown here
        with pytest.raises(ConfigError, match="MEDHASH_API_TOKEN is empty or blank"):
            auth_token(cfg, host)
    monkeypatch.setenv("MEDHASH_API_TOKEN", "  \t ")
    with pytest.raises(ConfigError, match="empty or blank"):
        auth_token(cfg, "0.0.0.0")
    monkeypatch.setenv("MEDHASH_API_TOKEN", "t0ken")
    assert auth_token(cfg, "0.0.0.0") == auth_token(cfg, None) == "t0ken"
    assert auth_token(ServeConfig(require_auth=True), "127.0.0.1") == "t0ken"
    assert auth_token(ServeConfig(require_auth=False), "0.0.0.0") is None


def test_the_app_builder_of_a_serve_config_refuses_to_build_without_a_token(monkeypatch, tmp_path):
    monkeypatch.delenv("MEDHASH_API_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="MEDHASH_API_TOKEN"):
        app_builder({"run": str(tmp_path / "no-run-needed")})  # refused before the run is read


def test_deploy_serve_yaml_is_read_as_a_serve_config():
    settings, options, args = read_serve_config(DEPLOY)
    assert (settings.serve.host, settings.serve.port) == ("0.0.0.0", 8000)
    assert set(options) == {"ImageEncoder", "TextEncoder", "Hasher", "Index", "Ingress"}
    assert options["TextEncoder"]["autoscaling_config"]["max_replicas"] == 4
    assert args["run"] and is_server_uri(args["milvus_uri"])


def test_milvus_lite_files_are_not_servers():
    assert not is_server_uri("/data/index/medhash.db")
    assert is_server_uri("http://milvus:19530") and is_server_uri("tcp://10.0.0.2:19530")


def test_app_builder_refuses_unknown_arguments():
    with pytest.raises(ConfigError, match="run"):
        app_builder({"milvus_uri": "x.db"})
    with pytest.raises(ConfigError, match="colour"):
        app_builder({"run": "r", "colour": "red"})
