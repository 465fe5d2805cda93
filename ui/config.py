"""The front end's settings and errors. The UI imports nothing of medhash but its own modules: it talks
to the search API over HTTP only, so it can run on a machine that has no model, index or torch.

``medhash ui --config FILE`` reads a YAML mapping of these fields; command-line options override them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class UIError(Exception):
    """A problem the person starting or using the UI can fix (settings, logins, the API not answering)."""


class UIConfig(BaseModel):
    """The Gradio front end: where the search API is, who may log in, input limits."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    api_url: str = "http://127.0.0.1:8000"  # the serving HTTP API
    api_token_env: str = "MEDHASH_API_TOKEN"  # bearer token for the API, when it requires one
    host: str = "127.0.0.1"
    port: int = Field(7860, ge=1, le=65535)
    users: dict[str, str] = {}  # user -> password; prefer users_env outside demos
    users_env: str = "MEDHASH_UI_USERS"  # environment variable of "user:password" pairs, comma-separated
    max_upload_bytes: int = Field(20 * 2**20, ge=1024)
    max_k: int = Field(50, ge=1)
    request_timeout_s: float = Field(60.0, gt=0)


def load_ui_config(path: Path | None = None, **given: Any) -> UIConfig:
    """The settings in ``path`` (or the defaults) with the ``given`` fields that are not None; UIError naming bad fields."""
    raw: dict = {}
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise UIError(f"cannot read the UI config {path}: {exc}") from exc
        if not isinstance(raw, dict):
            raise UIError(f"{path}: expected a mapping of UI settings")
    raw.update({key: value for key, value in given.items() if value is not None})
    try:
        return UIConfig.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise UIError(f"invalid UI configuration: {problems}") from exc
