"""Serving configuration without a cluster: auth rule, the Serve config file, the app builder's arguments."""
from __future__ import annotations

from pathlib import Path

import pytest

from medhash.serving.app import app_builder, auth_token, is_server_uri
from medhash.serving.cli import read_serve_config
from medhash.serving.config import ServeConfig
from medhash.services.errors import ConfigError

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "serve.yaml"


def test_auth_is_on_off_localhost_and_needs_a_token(monkeypatch):
    monkeypatch.delenv("MEDHASH_API_TOKEN", raising=False)
    assert auth_token(ServeConfig(host="127.0.0.1")) is None
    with pytest.raises(ConfigError, match="MEDHASH_API_TOKEN"):
        auth_token(ServeConfig(host="0.0.0.0"))
    monkeypatch.setenv("MEDHASH_API_TOKEN", "t0ken")
    assert auth_token(ServeConfig(host="0.0.0.0")) == "t0ken"
    assert auth_token(ServeConfig(host="127.0.0.1", require_auth=True)) == "t0ken"
    assert auth_token(ServeConfig(host="0.0.0.0", require_auth=False)) is None


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
