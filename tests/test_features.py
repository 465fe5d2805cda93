"""Feature cache: shards, resume after an interruption, cache hits, bad items skipped."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medhash.services.config import ImageBackboneConfig, TextBackboneConfig, load_config
from medhash.services.data.item import Dataset, Item
from medhash.services.backbones.image import build_image_backbone
from medhash.services.backbones.text import build_text_backbone
from medhash.services.features.cache import FeatureCache, extract_image_features, extract_text_features


@pytest.fixture(scope="module")
def tiny_image_encoder(tmp_path_factory):
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    folder = tmp_path_factory.mktemp("tiny-vit")
    torch.manual_seed(0)
    ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=32)).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return build_image_backbone(ImageBackboneConfig(kind="hf", name=str(folder)))


@pytest.fixture(scope="module")
def tiny_text_encoder(tmp_path_factory):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz"]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=64)).save_pretrained(folder)
    return build_text_backbone(TextBackboneConfig(name=str(folder), max_length=32, batch_size=3))


def make_dataset(folder: Path, n: int = 10, name: str = "tiny") -> Dataset:
    """``n`` small random images (grey and RGB, varied sizes), one item each."""
    rng = np.random.default_rng(0)
    items = []
    for i in range(n):
        path = folder / f"img{i}.png"
        shape = (20 + i, 30) if i % 3 else (24, 18, 3)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)
        items.append(Item(id=f"id{i}", image_paths=(path,), report=f"report {i}", patient_id=f"p{i}",
                          labels=(), split="train"))
    return Dataset(name=name, items=items, label_names=[])


class CountCalls:
    """Counts forward calls of a real module; with ``stop_after`` it interrupts the run like Ctrl-C."""

    def __init__(self, module: torch.nn.Module, stop_after: int | None = None):
        self.calls, self.stop_after = 0, stop_after
        self.handle = module.register_forward_pre_hook(self)

    def __call__(self, module, args):
        if self.stop_after is not None and self.calls == self.stop_after:
            raise KeyboardInterrupt
        self.calls += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_extract_then_serve_from_cache(tmp_path, tiny_image_encoder):
    dataset = make_dataset(tmp_path, n=10)
    cache = FeatureCache.for_encoder(dataset.name, tiny_image_encoder, "image")
    with CountCalls(tiny_image_encoder) as counter:
        ids, features = extract_image_features(dataset, tiny_image_encoder, cache, batch_size=4, progress=False)
    assert counter.calls == 3 and ids == [item.id for item in dataset.items]
    assert features.shape == (10, 16) and features.dtype == np.float32
    assert len(list(cache.dir.glob("*.npy"))) == 3
    assert (cache.dir / "key.txt").read_text().strip() == f"image|{tiny_image_encoder.preprocessing_key}"
    with CountCalls(tiny_image_encoder) as counter:
        again_ids, again = extract_image_features(dataset, tiny_image_encoder, cache, batch_size=4, progress=False)
    assert counter.calls == 0 and again_ids == ids
    np.testing.assert_array_equal(again, features)


def test_interrupted_run_resumes_with_what_was_written(tmp_path, tiny_image_encoder):
    dataset = make_dataset(tmp_path, n=10, name="resume")
    cache = FeatureCache.for_encoder(dataset.name, tiny_image_encoder, "image")
    with CountCalls(tiny_image_encoder, stop_after=2), pytest.raises(KeyboardInterrupt):
        extract_image_features(dataset, tiny_image_encoder, cache, batch_size=3, progress=False)
    assert len(cache.load()) == 6  # two finished batches kept
    with CountCalls(tiny_image_encoder) as counter:
        ids, features = extract_image_features(dataset, tiny_image_encoder, cache, batch_size=3, progress=False)
    assert counter.calls == 2  # the 4 missing items only
    fresh = FeatureCache(dataset.name, "fresh", root=tmp_path / "other-cache")
    _, reference = extract_image_features(dataset, tiny_image_encoder, fresh, batch_size=10, progress=False)
    assert len(ids) == 10
    np.testing.assert_allclose(features, reference, atol=1e-5)


def test_bad_images_are_reported_and_skipped(tmp_path, tiny_image_encoder, capsys):
    dataset = make_dataset(tmp_path, n=5, name="bad")
    (tmp_path / "corrupt.png").write_bytes(b"this is not a png")
    bad = [
        Item("corrupt", (tmp_path / "corrupt.png",), "r", "p", (), "train"),
        Item("missing", (tmp_path / "missing.png",), "r", "p", (), "train"),
        Item("no-image", (), "r", "p", (), "train"),
    ]
    dataset.items[2:2] = bad
    cache = FeatureCache.for_encoder(dataset.name, tiny_image_encoder, "image")
    ids, features = extract_image_features(dataset, tiny_image_encoder, cache, batch_size=4, progress=False)
    assert ids == ["id0", "id1", "id2", "id3", "id4"] and features.shape == (5, 16)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("skipped item")]
    assert len(lines) == 3
    assert "corrupt.png" in lines[0] and "missing.png" in lines[1] and "skipped item no-image: no image file" == lines[2]


def test_item_with_several_images_gets_their_mean(tmp_path, tiny_image_encoder):
    dataset = make_dataset(tmp_path, n=2, name="multi")
    both = Item("both", (dataset.items[0].image_paths[0], dataset.items[1].image_paths[0]), "r", "p", (), "train")
    dataset.items.append(both)
    cache = FeatureCache.for_encoder(dataset.name, tiny_image_encoder, "image")
    ids, features = extract_image_features(dataset, tiny_image_encoder, cache, progress=False)
    assert ids == ["id0", "id1", "both"]
    np.testing.assert_allclose(features[2], features[:2].mean(axis=0), atol=1e-5)


def test_unfinished_shards_are_ignored(tmp_path, tiny_image_encoder):
    cache = FeatureCache("partial", "key", root=tmp_path)
    cache.write(["a", "b"], np.ones((2, 4)))
    np.save(cache.dir / "orphan.npy", np.zeros((3, 4)))  # rows written, keys never committed
    (cache.dir / ".x.json.partial").write_text("[")
    (cache.dir / "broken.json").write_text('["c"]')  # keys without rows
    rows = cache.load()
    assert sorted(rows) == ["a", "b"] and rows["a"].dtype == np.float32


def test_text_features_keyed_by_view_and_text(tmp_path, tiny_text_encoder, capsys):
    ids = ["a", "b", "c", "d", "e"]
    texts = ["chest x ray", "liver lesion", "", "brain mri", "lung nodule"]
    cache = FeatureCache.for_encoder("tiny", tiny_text_encoder, "report")
    with CountCalls(tiny_text_encoder) as counter:
        found, features = extract_text_features(ids, texts, tiny_text_encoder, cache, progress=False)
    assert found == ["a", "b", "d", "e"] and features.shape == (4, 16) and counter.calls == 2
    assert "skipped item c: empty text" in capsys.readouterr().err
    np.testing.assert_allclose(features, tiny_text_encoder.encode(["chest x ray", "liver lesion", "brain mri",
                                                                    "lung nodule"]).numpy(), atol=1e-5)
    texts[1] = "liver cyst"  # an edited text is encoded again, the others come from the cache
    with CountCalls(tiny_text_encoder) as counter:
        _, edited = extract_text_features(ids, texts, tiny_text_encoder, cache, progress=False)
    assert counter.calls == 1
    np.testing.assert_array_equal(edited[[0, 2, 3]], features[[0, 2, 3]])
    summary_cache = FeatureCache.for_encoder("tiny", tiny_text_encoder, "summary")
    assert summary_cache.dir != cache.dir and summary_cache.load() == {}


@pytest.mark.real
def test_medpix2_features_with_the_real_backbones(shared_data, tmp_path, capsys):
    from medhash.services.data import open_dataset
    from medhash.services.features.cli import run

    cfg = load_config(None, {"data.dataset": "medpix2", "data.root": shared_data / "medpix2"})
    dataset = open_dataset(cfg.data)
    assert len(dataset) == 2050
    args = type("Args", (), dict(dataset="medpix2", root=str(shared_data / "medpix2"), config=None,
                                 modality="both", limit=12))
    assert run(args) == 0
    out = capsys.readouterr().out
    assert "image features: 12 x 1,280" in out and "text features: 12 x 384" in out
    assert re.search(r"12 encoded, 0 from cache, .* images/s", out)
    assert run(args) == 0
    assert "0 encoded, 12 from cache" in capsys.readouterr().out
    encoder = build_image_backbone(cfg.image_backbone)
    rows = FeatureCache.for_encoder("medpix2", encoder, "image").load()
    first = dataset.items[0]
    from medhash.services.data.images import load_image

    with torch.inference_mode():
        direct = encoder(encoder.preprocess(load_image(first.image_paths[0])).unsqueeze(0))[0].numpy()
    np.testing.assert_allclose(rows[first.id], direct, rtol=1e-4, atol=1e-4)


@pytest.mark.real
def test_training_views_from_the_llm_and_the_extractive_generator(shared_data):
    """A few MedPix items' views as training reads them with ``augment.also_extractive``: one column per
    generator and template, the offline Gemma's (full depth, copy-constrained) first, then the extractive ones."""
    from dataclasses import replace

    from medhash.services.data import open_dataset
    from medhash.services.features.featureset import build_featureset

    cfg = load_config(Path(__file__).parents[1] / "training" / "configs" / "medpix2-lsch.yaml", {
        "data.root": shared_data / "medpix2", "augment.use_views": True, "augment.also_extractive": True,
        "augment.templates": ["image_description", "report_summary"], "augment.batch_size": 3,
    })
    dataset = open_dataset(cfg.data)
    few = replace(dataset, items=[item for item in dataset.items if item.split == "train"][:3])
    features = build_featureset(cfg, few, progress=False)

    templates = cfg.augment.templates
    assert features.view_names == tuple(f"{g}:{t}" for g in ("local", "extractive") for t in templates)
    assert features.views.shape == (3, 2 * len(templates), features.text.shape[1])
    llm, extractive = features.views[:, :len(templates)], features.views[:, len(templates):]
    assert np.isfinite(features.views).all() and not np.allclose(llm, extractive, atol=1e-3)
    assert (np.abs(features.views - features.text[:, None]).max(axis=2) > 1e-3).mean() > 0.5  # mostly not the report


def test_unlabelled_training_items_take_the_labels_most_of_their_neighbours_hold():
    from medhash.services.features.featureset import FeatureSet, findings_from_neighbours

    # two tight groups of items, one per label; each group holds one unlabelled training item and one dev item
    group = lambda centre, n: centre + 0.01 * np.arange(n)[:, None]  # noqa: E731
    image = np.concatenate([group(np.array([[1.0, 0.0]]), 5), group(np.array([[0.0, 1.0]]), 5)]).astype(np.float32)
    labels = np.array([[1, 0]] * 3 + [[0, 0]] * 2 + [[0, 1]] * 3 + [[0, 0]] * 2, dtype=np.uint8)
    splits = np.array((["train"] * 4 + ["dev"]) * 2)
    features = FeatureSet(
        dataset="tiny", ids=np.array([f"i{r}" for r in range(10)]), image=image, text=image.copy(),
        views=np.zeros((10, 0, 2), np.float32), view_names=(), labels=labels, label_names=("a", "b"),
        splits=splits, groups=np.array([f"g{r}" for r in range(10)]),
    )
    filled = findings_from_neighbours(features, k=3)
    assert filled.labels[3].tolist() == [1, 0] and filled.labels[8].tolist() == [0, 1]
    assert not filled.labels[[4, 9]].any()  # dev items stay as mined
    assert (filled.labels[labels.any(axis=1)] == labels[labels.any(axis=1)]).all()
    # with neighbours from both groups no label holds a majority, and the item stays unlabelled
    assert not findings_from_neighbours(features, k=6).labels[3].any()
