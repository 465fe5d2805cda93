"""A dataset's frozen backbone features, aligned row by row with ids, labels, splits and groups.

This is what every hashing method trains and is evaluated on: image features Z, report features,
and the features of the LLM-augmented text views, all from the feature cache.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, replace

import numpy as np

from medhash.services.config import MedhashConfig
from medhash.services.data import open_dataset
from medhash.services.data.item import Dataset

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeatureSet:
    """One row per item that has both an image and a report feature."""

    dataset: str
    ids: np.ndarray  # str [N]
    image: np.ndarray  # float32 [N, image_dim]
    text: np.ndarray  # float32 [N, text_dim], the report
    views: np.ndarray  # float32 [N, V, text_dim], augmented text views (V = 0 without augmentation)
    view_names: tuple[str, ...]
    labels: np.ndarray  # uint8 [N, L]
    label_names: tuple[str, ...]
    splits: np.ndarray  # str [N]: train / dev / query
    groups: np.ndarray  # str [N]: patient or case id

    def __len__(self) -> int:
        return len(self.ids)

    def rows(self, *splits: str) -> np.ndarray:
        """Row indices of the items in any of ``splits``."""
        return np.flatnonzero(np.isin(self.splits, splits))


def limit_per_split(dataset: Dataset, limit: int) -> Dataset:
    """The first ``limit`` items of each split (tiny configurations run the same code on less data)."""
    seen: dict[str, int] = {}
    kept = []
    for item in dataset.items:
        if seen.get(item.split, 0) < limit:
            seen[item.split] = seen.get(item.split, 0) + 1
            kept.append(item)
    return replace(dataset, items=kept)


def build_featureset(cfg: MedhashConfig, dataset: Dataset | None = None, progress: bool = True) -> FeatureSet:
    """Read (or compute once and cache) every feature ``cfg`` asks for, of ``dataset`` as given or of
    ``cfg.data`` (then cut to ``train.limit_items`` per split)."""
    from medhash.services.backbones.image import build_image_backbone
    from medhash.services.backbones.text import build_text_backbone
    from medhash.services.features.cache import FeatureCache, extract_image_features, extract_text_features

    if dataset is None:
        dataset = open_dataset(cfg.data)
        if cfg.train.limit_items:
            dataset = limit_per_split(dataset, cfg.train.limit_items)
    for problem in dataset.problems:
        log.warning("%s: %s", dataset.name, problem)

    image_encoder = build_image_backbone(cfg.image_backbone)
    image_ids, image = extract_image_features(
        dataset, image_encoder, FeatureCache.for_encoder(dataset.name, image_encoder, "image"),
        batch_size=cfg.image_backbone.batch_size, progress=progress,
    )
    text_encoder = build_text_backbone(cfg.text_backbone, cfg.llm)
    items = {item.id: item for item in dataset.items}
    text_ids, text = extract_text_features(
        image_ids, [items[i].report for i in image_ids], text_encoder,
        FeatureCache.for_encoder(dataset.name, text_encoder, "report"), progress=progress,
    )
    image_row = {item_id: r for r, item_id in enumerate(image_ids)}
    keep = [image_row[i] for i in text_ids]
    image = image[keep]
    ids = text_ids

    view_names, views = (), np.zeros((len(ids), 0, text.shape[1]), np.float32)
    if cfg.augment.use_views:
        view_names, views = _view_features(cfg, dataset, ids, text, text_encoder, progress)

    label_matrix = dataset.label_matrix()
    row_of = {item.id: r for r, item in enumerate(dataset.items)}
    rows = np.array([row_of[i] for i in ids], dtype=np.int64)
    return FeatureSet(
        dataset=dataset.name,
        ids=np.array(ids, dtype=str),
        image=image.astype(np.float32),
        text=text.astype(np.float32),
        views=views,
        view_names=tuple(view_names),
        labels=label_matrix[rows],
        label_names=tuple(dataset.label_names),
        splits=np.array([items[i].split for i in ids], dtype=str),
        groups=np.array([items[i].patient_id for i in ids], dtype=str),
    )


def _view_features(cfg, dataset, ids, report_features, text_encoder, progress):
    """Features of each augmented text view (each template of each generator training reads); an item without
    a view falls back to its report."""
    from medhash.services.augment import augment_dataset
    from medhash.services.augment.generators import generator_key
    from medhash.services.features.cache import FeatureCache, extract_text_features

    sections = cfg.augment.generators()
    columns = [(section, template) for section in sections for template in section.templates]
    names = [f"{section.generator}:{template}" if len(sections) > 1 else template for section, template in columns]
    augmented = {s.generator: augment_dataset(dataset, s, cfg.llm, progress=progress) for s in sections}
    views = np.repeat(report_features[:, None, :], len(columns), axis=1).copy()
    position = {item_id: r for r, item_id in enumerate(ids)}
    for v, (section, template) in enumerate(columns):
        texts = augmented[section.generator]
        have = [i for i in ids if texts.get(i, {}).get(template, "").strip()]
        view = f"augment:{template}:{generator_key(section, cfg.llm)}"  # the feature cache's text name
        cache = FeatureCache.for_encoder(dataset.name, text_encoder, view)
        found, matrix = extract_text_features(have, [texts[i][template] for i in have], text_encoder, cache,
                                              progress=progress)
        for item_id, row in zip(found, matrix):
            views[position[item_id], v] = row
    return names, views.astype(np.float32)


def supervised_by_findings(features: FeatureSet, dataset: Dataset, categories: Iterable[str],
                           neighbours: int = 0) -> FeatureSet:
    """``features`` with its labels replaced by the findings of ``categories`` mined from each item's report
    (vocabulary from the train split): what a label-free run trains on (``train.supervision: findings``).
    ``neighbours`` > 0: training items with none take them from their neighbours (:func:`findings_from_neighbours`)."""
    from medhash.services.findings import FindingMiner, findings_labels

    reports = {item.id: item.report for item in dataset.items}
    labels, names = findings_labels(FindingMiner(), [reports[i] for i in features.ids], features.rows("train"),
                                    categories)
    log.info("%s: supervised by %d mined findings instead of its %d labels", features.dataset, len(names),
             len(features.label_names))
    features = replace(features, labels=labels, label_names=names)
    return findings_from_neighbours(features, neighbours) if neighbours else features


def findings_from_neighbours(features: FeatureSet, k: int) -> FeatureSet:
    """``features`` where each training item without a label takes every label held by more than half of its ``k``
    nearest labelled training items, by the cosine of their pair features (:func:`pair_features`) centred on the
    training split (the items of other splits are left as they are)."""
    import torch

    from medhash.services.methods.losses import pair_features

    train = features.rows("train")
    have = features.labels[train].any(axis=1)
    donors, takers = train[have], train[~have]
    if not len(donors) or not len(takers):
        return features
    image, text = (torch.from_numpy(m - m[train].mean(axis=0, keepdims=True)) for m in (features.image, features.text))
    joint = pair_features(image, text).numpy()
    cosine = joint[takers] @ joint[donors].T
    nearest = np.argsort(-cosine, axis=1)[:, :min(k, len(donors))]
    votes = features.labels[donors][nearest].mean(axis=1)
    labels = features.labels.copy()
    labels[takers] = (votes > 0.5).astype(labels.dtype)
    log.info("%s: %d of %d unlabelled training items took labels from their %d nearest neighbours",
             features.dataset, int(labels[takers].any(axis=1).sum()), len(takers), k)
    return replace(features, labels=labels)
