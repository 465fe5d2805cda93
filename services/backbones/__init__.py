"""Pretrained backbones: image encoder g(.), text encoder, causal LM; offline packages by default.

Heavy libraries are imported inside functions so that ``medhash --help`` stays fast.
"""
from __future__ import annotations

from medhash.services.errors import WeightsError


def load_hf_model(name: str, what: str):
    """``AutoModel.from_pretrained(name)``, refusing any randomly initialised weight but a pooler.

    Returns the model in eval mode and whether its pooler was loaded (False: pool it yourself).
    """
    from transformers import AutoModel

    try:
        model, info = AutoModel.from_pretrained(name, output_loading_info=True)
    except (OSError, ValueError) as exc:
        raise WeightsError(
            f"cannot load {what} {name!r} (a Hugging Face id available offline or a local folder): "
            f"{str(exc).splitlines()[0]}"
        ) from exc
    missing = [key for key in info["missing_keys"] if "pooler" not in key]
    if missing:
        raise WeightsError(f"{what} {name!r} lacks pretrained weights for {', '.join(missing[:5])}")
    pooler_loaded = not any("pooler" in key for key in info["missing_keys"])
    return model.eval(), pooler_loaded
