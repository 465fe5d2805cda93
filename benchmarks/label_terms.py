"""Which pairs should the label term score? A screening study on the dev split.

    python -m medhash.benchmarks.label_terms --config training/configs/medpix2-lsch.yaml --bits 64 --seeds 0,1,2

LSCH's label term scores every cross-modal pair of a batch against its labels. Its similarity term (and the manifold
term) also score the pairs within each modality, at half weight each. Here the label term is LSCH's own
(:func:`medhash.services.methods.lsch.label_loss`, weight 50) in ``evaluation.md``'s floor recipe with LSCH's
similarity term (:mod:`medhash.benchmarks.floor_recipe`), on the frozen features every method hashes. The arms:

- the cross-modal pairs only (``label_within: 0``);
- plus each within-modal term at 0.5 of the cross-modal weight against "any shared label";
- plus each within-modal term at 0.25, 0.5 and 1 against the label-vector cosine (LSCH's ``label_within``);
- the cross-modal pairs plus DHaPH's multi-positive contrastive term (across and within the modalities, tau 0.3, no
  self-pacing) at weight 5: the baseline whose labels MAP led LSCH's at 32 and 64 bits.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from medhash.benchmarks.floor_recipe import (
    LabelTerm,
    frozen_feature_study,
    study_arguments,
    with_similarity,
)
from medhash.services.config import load_config
from medhash.services.features.featureset import build_featureset
from medhash.services.methods.dhaph import self_paced_loss
from medhash.services.methods.losses import pair_features, pairwise_label_loss
from medhash.services.methods.lsch import LSCHParams, label_loss
from medhash.training.trainer import with_resolved_data


def lsch_label_term(within: float) -> LabelTerm:
    """LSCH's label term at its default weight and scale, with ``within`` x each within-modal term."""
    params = LSCHParams(label_within=within)

    def term(u: Tensor, v: Tensor, labels: Tensor) -> Tensor:
        return params.label_weight * label_loss(u, v, labels, params)

    return term


def with_shared_within(within: float) -> LabelTerm:
    """LSCH's cross-modal label term plus ``within`` x each within-modal term against "any shared label"."""
    params = LSCHParams()

    def term(u: Tensor, v: Tensor, labels: Tensor) -> Tensor:
        pairs = pairwise_label_loss(u, u, labels, params.label_scale) + pairwise_label_loss(v, v, labels, params.label_scale)
        return params.label_weight * (label_loss(u, v, labels, params) + within * pairs)

    return term


def with_multi_positive(weight: float, tau: float = 0.3) -> LabelTerm:
    """LSCH's cross-modal label term plus ``weight`` x DHaPH's multi-positive contrastive term in all four
    directions (image-text, text-image, image-image, text-text), without self-pacing."""
    cross = lsch_label_term(0.0)

    def term(u: Tensor, v: Tensor, labels: Tensor) -> Tensor:
        pairs = ((u, v), (v, u), (u, u), (v, v))
        return cross(u, v, labels) + weight * sum(self_paced_loss(a, b, labels, tau, 0.0) for a, b in pairs)

    return term


def label_terms_study(config: Path, seeds: list[int], epochs: int, bits: int) -> str:
    """Markdown: per arm, the dev scores (mean +- std over ``seeds``)."""
    features = build_featureset(with_resolved_data(load_config(config)), progress=False)
    image, text = torch.from_numpy(features.image).float(), torch.from_numpy(features.text).float()
    labels = torch.from_numpy(features.labels.astype(np.float32))
    frozen = pair_features(image, text)
    inputs = (F.normalize(image, dim=1), F.normalize(text, dim=1))
    terms = {
        "cross-modal pairs only": lsch_label_term(0.0),
        "+ 0.5 x each within-modal term, any shared label": with_shared_within(0.5),
        "+ 0.25 x each within-modal term, label cosine": lsch_label_term(0.25),
        "+ 0.5 x each within-modal term, label cosine": lsch_label_term(0.5),
        "+ 1 x each within-modal term, label cosine": lsch_label_term(1.0),
        "+ 5 x DHaPH's multi-positive contrastive term": with_multi_positive(5.0),
    }
    arms = {arm: (with_similarity(labels, frozen, term), inputs) for arm, term in terms.items()}
    return frozen_feature_study(features, "label term", arms, seeds, epochs, bits)


def main() -> None:
    args = study_arguments(__doc__.splitlines()[0]).parse_args()
    print(label_terms_study(args.config, args.seeds, args.epochs, args.bits), flush=True)


if __name__ == "__main__":
    main()
