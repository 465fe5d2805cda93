"""The LLM reads the report (text_backbone.name: llm): the cached reading equals the full forward pass."""
from __future__ import annotations

import pytest
import torch

from medhash.services.backbones.llm import tiny_causal_lm
from medhash.services.backbones.reader import LLMReader, ReadingLayout
from medhash.services.config import LLM_READER, LLMConfig, load_config
from medhash.services.errors import ConfigError, DataError
from medhash.services.methods.lsch import LSCH
from medhash.services.methods.prompted_llm import PromptedLLM

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXTS = [
    "No pneumothorax.",
    "Axial non-contrast CT shows a hyperdense right MCA sign; no midline shift.",
    "Large left pleural effusion with collapse of the left lower lobe and mediastinal shift to the right, "
    "longer than the reader's window so that it is cut.",
]


def uncached(llm, tokenizer, prompted: PromptedLLM, text: str, tokens: int) -> torch.Tensor:
    """v of one text from the whole sequence [BOS, text, soft prompt, hard prompt] in one forward pass."""
    ids = [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"][: tokens - 1]
    with torch.no_grad():
        sequence = torch.cat([llm.get_input_embeddings()(torch.tensor(ids)), prompted.prefix("text")[1:]])
        hidden = llm.base_model(inputs_embeds=sequence[None]).last_hidden_state[0, len(ids):]
    return hidden.mean(dim=0) if prompted.pooling == "mean" else hidden[-1]


def assert_same(cached: torch.Tensor, full: torch.Tensor) -> None:
    """Equal to 1e-5 of the largest activation (float32 sums in another order)."""
    assert (cached - full).abs().max() <= 1e-5 * full.abs().max(), (cached - full).abs().max()


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_the_cached_reading_equals_the_full_forward_pass(pooling):
    llm, tokenizer = tiny_causal_lm()
    reader = LLMReader(llm, tokenizer, "tiny", max_length=40, batch_size=2)
    prompted = PromptedLLM(llm, tokenizer, {"image": "image:", "text": "report:"}, n_virtual_tokens=4,
                           pooling=pooling, seed=1)
    rows = reader.encode(TEXTS)
    assert rows.shape == (3, reader.dim) and reader.dim == ReadingLayout.of(llm.config, 40).width
    v = prompted.read(rows)
    for i, text in enumerate(TEXTS):  # different lengths, padding and a text cut at 40 tokens
        assert_same(v[i], uncached(llm, tokenizer, prompted, text, 40))
    v.sum().backward()  # the soft prompt trains through the cached keys and values
    assert prompted.soft_prompt.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in llm.parameters())


@pytest.mark.real
def test_gemma_reads_a_medpix_caption_as_its_full_forward_pass(shared_data):
    from medhash.services.backbones.llm import load_causal_lm
    from medhash.services.config import load_config as load
    from medhash.services.data import open_dataset

    cfg = load(None, {"data.dataset": "medpix2", "data.root": shared_data / "medpix2"})
    captions = [item.report for item in open_dataset(cfg.data).items[:3]]
    llm, tokenizer = load_causal_lm(LLMConfig(name="gemma-3-270m", num_layers=4))
    reader = LLMReader(llm, tokenizer, "gemma-3-270m", max_length=96, batch_size=3)
    params = LSCH.params_of(cfg)
    prompted = PromptedLLM(llm, tokenizer, {"image": params.image_prompt, "text": params.text_prompt},
                           n_virtual_tokens=params.n_virtual_tokens, seed=0)
    with torch.no_grad():
        v = prompted.read(reader.encode(captions))
    for i, caption in enumerate(captions):
        assert_same(v[i], uncached(llm, tokenizer, prompted, caption, 96))


def reading_config(**lsch):
    return load_config(None, {
        "codes.bits": (16,), "text_backbone": {"name": LLM_READER, "max_length": 32},
        "method_params": {"lsch": {"n_virtual_tokens": 4, "m_img_tokens": 2, "text_prompt": "report:", **lsch}},
    })


def test_lsch_embeds_readings_and_the_serving_path_shares_its_llm():
    from medhash.serving.pipeline import TextEmbedder

    llm, tokenizer = tiny_causal_lm()
    cfg = reading_config()
    layout = ReadingLayout.of(llm.config, 32)
    model = LSCH(cfg, 24, layout.width, 0, llm, tokenizer).eval()
    assert not hasattr(model, "text_tokens")  # no encoding layer: the LLM reads the words
    embedder = TextEmbedder(cfg, model)
    assert embedder.encoder.llm is llm  # one LLM in the text encoder's replica
    v = embedder(TEXTS[:2])
    with torch.no_grad():
        expected = model.embed_text(embedder.encoder.encode(TEXTS[:2]))
    assert v.shape == (2, llm.config.hidden_size) and torch.allclose(torch.tensor(v), expected)
    saved = model.state_dict_trainable()  # the trainable head after the LLM, with its running statistics
    assert "reading_head.norm.running_mean" in saved and "reading_head.mlp.0.weight" in saved
    with pytest.raises(DataError, match="empty"):
        embedder.encoder.encode(["  "])


def test_readings_are_refused_where_they_cannot_work():
    from medhash.services.methods.dcmh import DCMH

    llm, tokenizer = tiny_causal_lm()
    width = ReadingLayout.of(llm.config, 32).width
    with pytest.raises(ConfigError, match="LSCH's"):
        DCMH(reading_config(), 24, width, 0)
    with pytest.raises(ConfigError, match="use_llm"):
        LSCH(reading_config(use_llm=False), 24, width, 0, llm, tokenizer)
    with pytest.raises(ConfigError, match="lora_rank"):
        LSCH(reading_config(lora_rank=2), 24, width, 0, llm, tokenizer)
    model = LSCH(reading_config(use_soft_prompt=False, use_hard_prompt=False), 24, width, 0, llm, tokenizer)
    with pytest.raises(ConfigError, match="soft or a hard prompt"):
        model.embed_text(torch.zeros(1, width))
    model = LSCH(reading_config(), 24, width, 0, llm, tokenizer)
    with pytest.raises(ConfigError, match="another text_backbone"):
        model.embed_text(torch.zeros(1, 384))  # MiniLM features under a reading config
    window = llm.config.sliding_window
    with pytest.raises(ConfigError, match="attention window"):
        LLMReader(llm, tokenizer, "tiny", max_length=window, batch_size=1)
    long = LLMReader(llm, tokenizer, "tiny", max_length=window - 2, batch_size=1)
    with pytest.raises(ConfigError, match="prompt tokens exceed"):
        model.embed_text(long.encode(["x"]))
    model.train()  # the head's batch norm cannot standardise one row: a named error, not torch's
    with pytest.raises(ConfigError, match="at least 2 rows per worker"):
        model.embed_text(LLMReader(llm, tokenizer, "tiny", max_length=32, batch_size=1).encode(["x"]))
