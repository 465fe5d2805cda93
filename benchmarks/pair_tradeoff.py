"""Can a label-supervised hash keep the pair recall CCA-ITQ has? A screening study on the dev split.

    python -m medhash.benchmarks.pair_tradeoff --config training/configs/medpix2-lsch-ablation.yaml --seeds 0,1,2

CCA-ITQ ranks an image's own report higher (pair Recall@10) than every trained method, at a labels MAP 12 points
lower. Each arm changes one thing in ``evaluation.md``'s floor recipe (:mod:`medhash.benchmarks.floor_recipe`), on
the frozen features every method hashes:

- LSCH's similarity term (code cosines onto the frozen features' joint cosine, weight 10), and the same term on the
  canonical coordinates of a regularised CCA fitted on the train split (CCA-ITQ's first stage);
- the label term on only a share of the bits, leaving the rest to the instance and similarity terms;
- a margin label term: squared hinges that ask label-sharing pairs for a code cosine of at least 0.9 and the others
  for at most 0.1, so a label's items need not collapse onto one code;
- the canonical coordinates as the heads' inputs.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from medhash.benchmarks.floor_recipe import (
    floor_loss,
    frozen_feature_study,
    label_bce,
    study_arguments,
    with_similarity,
)
from medhash.services.config import load_config
from medhash.services.features.featureset import build_featureset
from medhash.services.methods.cca_itq import cca_directions
from medhash.services.methods.losses import label_similarity, pair_features
from medhash.training.trainer import with_resolved_data

CCA_DIMS, CCA_RIDGE = 128, 10.0  # CCA-ITQ's defaults: ridge 10 x the mean variance, eigenvalue-scaled directions


def canonical_coordinates(image: Tensor, text: Tensor, train_rows: np.ndarray) -> tuple[Tensor, Tensor]:
    """Every item's image and text features in the canonical space fitted on ``train_rows``, each coordinate
    scaled by its squared correlation (as CCA-ITQ projects them)."""
    mean_x, mean_y = image[train_rows].mean(dim=0), text[train_rows].mean(dim=0)
    wx, wy, correlations = cca_directions(image[train_rows] - mean_x, text[train_rows] - mean_y, CCA_DIMS, CCA_RIDGE)
    return (image - mean_x) @ wx * correlations**2, (text - mean_y) @ wy * correlations**2


def margin_label_loss(u: Tensor, v: Tensor, labels: Tensor, related: float = 0.9, unrelated: float = 0.1) -> Tensor:
    """Squared hinges on the cross-modal code cosines: at least ``related`` for pairs that share a label, at most
    ``unrelated`` for the others, over the pairs whose labels are known."""
    similarity, known = label_similarity(labels, "shared")
    cosine = F.normalize(u, dim=1) @ F.normalize(v, dim=1).T
    hinge = similarity * F.relu(related - cosine).pow(2) + (1 - similarity) * F.relu(cosine - unrelated).pow(2)
    return hinge[known].mean() if known.any() else u.new_zeros(())


def tradeoff_study(config: Path, seeds: list[int], epochs: int, bits: int) -> str:
    """Markdown: per arm, the dev scores (mean +- std over ``seeds``)."""
    features = build_featureset(with_resolved_data(load_config(config)), progress=False)
    train = features.rows("train")
    image, text = torch.from_numpy(features.image).float(), torch.from_numpy(features.text).float()
    labels = torch.from_numpy(features.labels.astype(np.float32))
    canonical_image, canonical_text = canonical_coordinates(image, text, train)
    frozen, canonical = pair_features(image, text), pair_features(canonical_image, canonical_text)
    unit = (F.normalize(image, dim=1), F.normalize(text, dim=1))
    standardised = (canonical_image / canonical_image[train].std(), canonical_text / canonical_text[train].std())
    arms = {
        "the floor recipe": (floor_loss(labels), unit),
        "+ similarity term (weight 10) on the frozen features": (with_similarity(labels, frozen, label_bce()), unit),
        "+ similarity term on the canonical coordinates": (with_similarity(labels, canonical, label_bce()), unit),
        f"+ similarity term, label term on {3 * bits // 4} of the {bits} bits":
            (with_similarity(labels, frozen, label_bce(3 * bits // 4)), unit),
        f"+ similarity term, label term on {bits // 2} of the {bits} bits":
            (with_similarity(labels, frozen, label_bce(bits // 2)), unit),
        "+ similarity term, margin label term (0.9 / 0.1, weight 300)":
            (with_similarity(labels, frozen, lambda u, v, y: 300 * margin_label_loss(u, v, y)), unit),
        "+ similarity term, canonical coordinates as the heads' inputs":
            (with_similarity(labels, frozen, label_bce()), standardised),
    }
    return frozen_feature_study(features, "arm", arms, seeds, epochs, bits)


def main() -> None:
    args = study_arguments(__doc__.splitlines()[0]).parse_args()
    print(tradeoff_study(args.config, args.seeds, args.epochs, args.bits), flush=True)


if __name__ == "__main__":
    main()
