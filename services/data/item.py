"""The one item / dataset interface every source maps onto."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SPLITS = ("train", "dev", "query")


@dataclass(frozen=True)
class Item:
    """One image-report pair (or a report with several images).

    ``labels`` are names from the dataset's label list, prefixed by source
    (``location:Head``, ``topic:Diverticulum``, ``finding:COVID-19``, ``mesh:Cardiomegaly``,
    ``chexpert:Edema``). ``split`` is one of :data:`SPLITS`; the retrieval database is every item
    whose split is not ``query``.
    """

    id: str
    image_paths: tuple[Path, ...]
    report: str
    patient_id: str
    labels: tuple[str, ...]
    split: str
    view: str = ""
    sections: dict[str, str] = field(default_factory=dict, hash=False, compare=False)


@dataclass
class Dataset:
    """Items of one source with their label list, and the problems met while reading it."""

    name: str
    items: list[Item]
    label_names: list[str]
    problems: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.items)

    def label_matrix(self) -> np.ndarray:
        """Multi-hot labels, uint8 of shape (items, labels), columns in ``label_names`` order."""
        column = {name: j for j, name in enumerate(self.label_names)}
        matrix = np.zeros((len(self.items), len(self.label_names)), dtype=np.uint8)
        for i, item in enumerate(self.items):
            for label in item.labels:
                matrix[i, column[label]] = 1
        return matrix

    def split_counts(self) -> Counter:
        return Counter(item.split for item in self.items)
