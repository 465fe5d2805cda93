"""A self-contained run directory: everything needed to evaluate, serve or reproduce a trained model.

    config.yaml        the full validated configuration, with the absolute data folder training read
                       (so eval, index and serve find the data without MEDHASH_DATA; --root still wins)
    model.safetensors  the trained weights (the model selected on dev), frozen backbones excluded
    labels.json        the label list, in the order of the label vectors
    history.json       per-epoch losses and dev scores (training also plots them as loss.png)
    meta.json          git commit, dataset sizes, feature widths, selected epoch, wall time
    ray/               Ray Train's checkpoints (a re-run with the same --out resumes from them)
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import yaml

from medhash.services.config import DataConfig, MedhashConfig, load_config, override
from medhash.services.errors import ConfigError


class RunDir:
    def __init__(self, path: Path | str):
        self.path = Path(path)

    config_file = property(lambda self: self.path / "config.yaml")
    weights_file = property(lambda self: self.path / "model.safetensors")
    labels_file = property(lambda self: self.path / "labels.json")
    history_file = property(lambda self: self.path / "history.json")
    meta_file = property(lambda self: self.path / "meta.json")
    ray_storage = property(lambda self: self.path / "ray")

    def is_complete(self) -> bool:
        return self.weights_file.is_file() and self.meta_file.is_file()

    def write(self, cfg: MedhashConfig, weights: dict, label_names, history, meta) -> None:
        from safetensors.torch import save_file

        self.path.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), encoding="utf-8")
        save_file({k: v.contiguous() for k, v in weights.items()}, str(self.weights_file))
        self.labels_file.write_text(json.dumps(list(label_names), indent=1), encoding="utf-8")
        self.history_file.write_text(json.dumps(history, indent=1), encoding="utf-8")
        self.meta_file.write_text(json.dumps({"git_commit": git_commit(), **meta}, indent=1), encoding="utf-8")

    def config(self) -> MedhashConfig:
        self._require()
        return load_config(self.config_file)

    def data_config(self, dataset: str | None = None, root: Path | None = None) -> DataConfig:
        """The run's ``data`` section, or the defaults of another ``dataset``; ``root`` overrides the folder."""
        data = self.config().data
        if dataset is not None and dataset != data.dataset:
            data = DataConfig(dataset=dataset)
        return override(data, {"root": root})

    def weights(self) -> dict:
        """The trained tensors by name (torch)."""
        from safetensors.torch import load_file

        self._require()
        return load_file(str(self.weights_file))

    def label_names(self) -> list[str]:
        return json.loads(self.labels_file.read_text(encoding="utf-8"))

    def meta(self) -> dict:
        return json.loads(self.meta_file.read_text(encoding="utf-8"))

    def _require(self) -> None:
        if not self.is_complete():
            raise ConfigError(f"{self.path} is not a finished run directory (no model.safetensors / meta.json)")


def git_commit() -> str:
    """The commit of the medhash source tree, or "unknown" outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"
