"""Bulk ingestion (`medhash index`): a dataset's cached features -> the run's model -> codes -> index upsert.

Both modalities of every item at every trained code length; records are keyed by (id, modality),
so running it again replaces rather than duplicates. A dataset item is one study (a report and its
images), so its id is also the record's study id. Items whose image or report cannot be read
are reported by the feature extraction and left out; the rest are indexed.
"""
from __future__ import annotations

import numpy as np
from tqdm import tqdm

from medhash.serving.pipeline import Hasher
from medhash.services.config import MedhashConfig, override
from medhash.services.data.item import Dataset
from medhash.services.features.featureset import FeatureSet, build_featureset
from medhash.services.methods import embed, load_trained
from medhash.services.run_dir import RunDir


def index_features(cfg: MedhashConfig, dataset: Dataset, progress: bool = True) -> FeatureSet:
    """Image and report features of every item of ``dataset`` with the run's backbones (from the cache)."""
    return build_featureset(override(cfg, {
        "augment.use_views": False,  # views are not indexed
    }), dataset, progress=progress)


def item_records(items, modality: str, codes: np.ndarray) -> list:
    """One medhash.services.index.IndexRecord per dataset item: its packed code of ``modality`` and its metadata."""
    from medhash.services.index import IndexRecord

    return [
        IndexRecord(
            id=item.id, modality=modality, code=code.tobytes(), patient_id=item.patient_id, study_id=item.id,
            labels=tuple(item.labels), view=item.view, snippet=item.report,  # the index keeps its first 2,048 bytes
            image_ref=str(item.image_paths[0]),
        )
        for item, code in zip(items, codes)
    ]


def ingest_dataset(run: RunDir, index, dataset: Dataset, batch_size: int = 256, progress: bool = True) -> int:
    """Upsert every item of ``dataset`` into ``index`` (a medhash.services.index.CodeIndex) and flush it;
    returns the items indexed."""
    cfg, model = load_trained(run)
    features = index_features(cfg, dataset, progress)
    items = {item.id: item for item in dataset.items}
    hasher = Hasher(model)
    with tqdm(total=len(features), unit="item", desc=f"index {dataset.name}", disable=not progress) as bar:
        for start in range(0, len(features), batch_size):
            rows = np.arange(start, min(start + batch_size, len(features)))
            batch = [items[i] for i in features.ids[rows]]
            v = embed(model, features.image[rows], features.text[rows])
            for bits in hasher.bits:
                index.upsert(bits, [r for m in ("image", "text") for r in item_records(batch, m, hasher(v[m], bits))])
            bar.update(len(rows))
    index.flush()  # sealed and, on a server, indexed: searches use the IVF index, not a scan of new rows
    return len(features)
