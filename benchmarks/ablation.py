"""LSCH studies: variants of one configuration trained and evaluated side by side.

    python -m medhash.benchmarks.ablation --config training/configs/medpix2-lsch-ablation.yaml --bits 64 \\
        --study stages --seeds 0,1,2 --out runs/ablation

trains every variant of the study through the same Ray Train entry point (same data, split and
schedule; one run per seed), evaluates each by the three protocols and writes ``<study>.md``
(MAP@all I2T / T2I per protocol and pair R@10, mean +- std over the seeds).

- ``stages``: the full model and each stage switched off in turn (method.md's ablation).
- ``negatives``: which items the contrastive term may push apart, and the manifold weight alpha;
- ``classification``: the label-classification constraint on the codes (gamma) with alpha;
- ``loss``: the dev-selected defaults (pairwise label term, MLP encoding layers, plain InfoNCE, no CD
  pre-training, no text views) against the previous ones and with CD pre-training back;
  run the last three with ``--on dev`` (dev queries against train) to choose a setting without the queries;
- ``label-weight``: the weight of the pairwise label term, which trades labels and topic MAP against pair recall;
- ``findings-weight``: the same term on a label-free config (``train.supervision: findings``), where it is
  supervised by the mined findings;
- ``findings-categories``: the findings term on the anatomy and diagnosis terms only (the "finding" terms,
  such as mass or enhancement, barely track the dataset's labels);
- ``instance-temperature``: the InfoNCE temperature, which sets how hard the instance term pushes every
  other item away (a label-free run has nothing else to keep same-region items together);
  ``supervised-temperature`` the same beside the label term; ``supervised-batch``: batches of 256 with labels;
- ``label-free-encoder``: at tau 1, tau 2 and linear encoding layers (CCA-ITQ, linear, keeps what MLPs overfit);
- ``label-free-selection``: at tau 1 with no findings term, the epoch chosen on the anatomy findings only, and
  batches of 256 (more negatives for the instance term);
- ``supervised-pair``: levers for pair recall beside the label term: its scale (how soon it stops pulling a
  label's items together), weight decay, and the similarity-preserving term (a code memory of earlier batches'
  codes and dropout on the frozen features were measured here too, and a heavier bit-balance term in a study of
  its own; all three were removed: docs/results.md);
- ``supervised-similarity``: the similarity term's weight with labels, and a heavier label term beside it;
- ``supervised-hard-negatives``: plain InfoNCE instead of the negatives re-weighted by difficulty, beside the label
  term (the 16-epoch stage ablation found the re-weighting level or behind);
- ``supervised-label-balance``: the related and the unrelated pairs weigh half each in the label term, so neither
  the many unrelated pairs of MedPix nor the many related ones of COVID set the codes' cosines on their own
  (a bias in the label term's logits was measured here too, and removed: docs/results.md);
- ``augmentation-views``: no views, the extractive text views, the views the LLM wrote under the copy constraint
  and the grounding check (``medhash augment`` first: the cache holds them), or both;
- ``label-free``: the temperature and the findings categories that paid on dev, together;
- ``label-free-findings-use``: the mined findings where labels would go besides the label term: in the manifold
  term's S_ma (alpha > 0) and as false negatives (an item with the same findings is not pushed away);
- ``label-free-regions``: the label term on the body regions the mined anatomy terms lie in (the lexicon's
  ``region`` section), which name fewer, broader classes than the anatomy terms themselves;
- ``label-free-regions-plus``: beside the regions of the label-free config, the diagnosis terms (MedPix's labels are
  a region or a topic), the extractive views or the similarity term; and a heavier label term or a sharper
  instance term around the config's;
- ``similarity-weight``: the similarity-preserving term (code cosines onto the frozen features' joint
  cosine), which needs no labels, against the instance term alone (0).

Finished runs are skipped, so an interrupted study resumes.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from medhash.benchmarks.runs import slug, trained_results
from medhash.services.config import load_config, parse_assignments

STUDIES = {
    "stages": {
        "LSCH (full)": {},
        "with augmentation (extractive views)": {"augment.use_views": True},  # views are off by default
        "w/o structured encoding": {"use_structured_encoding": False},
        "w/o soft prompt": {"use_soft_prompt": False},
        "w/o hard prompt": {"use_hard_prompt": False},
        "w/o GBRBM (sign of linear)": {"use_gbrbm": False},
        "w/o hard-negative mining": {"hard_negative_mining": False},
        "w/o LLM (linear pooling)": {"use_llm": False},
    },
    "negatives": {
        f"{mask}, alpha {alpha}": {"false_negatives": mask, "alpha": alpha}
        for mask in ("shared_label", "same_labels", "none")
        for alpha in (0.5, 2.0)
    },
    "classification": {  # compare with the "negatives" study's shared_label rows (gamma 0)
        f"alpha 2.0, gamma {gamma}": {"alpha": 2.0, "classification_weight": gamma} for gamma in (1.0, 5.0)
    },
    "loss": {  # the defaults chosen on dev, against the previous ones and with CD pre-training back
        "previous defaults": {
            "label_weight": 0.0, "false_negatives": "shared_label", "alpha": 0.5, "beta": 0.8, "encoder_hidden": 0,
            "align_epochs": 2, "rbm_epochs": 1, "augment.use_views": True,
        },
        "defaults": {},
        "+ CD pre-training (2 align + 1 CD epochs)": {"align_epochs": 2, "rbm_epochs": 1},
    },
    "label-weight": {  # the label term against the instance (pair) term
        f"label weight {weight:g}": {"label_weight": weight} for weight in (50.0, 20.0, 10.0, 5.0)
    },
    "findings-weight": {  # label-free configs: the mined-findings term against the instance term (0: instance only)
        f"findings weight {weight:g}": {"label_weight": weight} for weight in (50.0, 5.0, 1.0, 0.0)
    },
    "findings-categories": {  # label-free configs: which mined categories the findings term trains on
        f"{' + '.join(categories)}, weight {weight:g}{', graded' if graded else ''}": {
            "train.findings_categories": categories, "label_weight": weight,
            **({"label_target": "graded"} if graded else {}),
        }
        for categories, weight, graded in (
            (("anatomy", "diagnosis"), 5.0, False), (("anatomy", "diagnosis"), 20.0, False),
            (("anatomy",), 5.0, False), (("anatomy",), 20.0, False), (("anatomy", "diagnosis"), 5.0, True),
        )
    },
    "instance-temperature": {  # label-free configs: the InfoNCE temperature (UCCH contrasts at 0.9)
        f"tau {tau:g}": {"tau": tau} for tau in (0.1, 0.3, 0.5, 1.0)
    },
    "label-free-encoder": {  # label-free configs at tau 1: a softer instance term still, or linear encoding layers
        "tau 2": {"tau": 2.0},
        "tau 1, linear encoding layers": {"tau": 1.0, "encoder_hidden": 0},
    },
    "label-free-selection": {  # label-free configs at tau 1: the epoch chosen by dev MAP over the anatomy findings only
        "tau 1, epoch by anatomy findings": {"tau": 1.0, "train.findings_categories": ("anatomy",)},
        "tau 1, batches of 256": {"tau": 1.0, "train.batch_size": 256},
    },
    "supervised-temperature": {  # the same on supervised configs, where the label term keeps the regions together
        f"tau {tau:g}": {"tau": tau} for tau in (0.1, 0.3, 0.5, 0.05)
    },
    "supervised-batch": {  # supervised configs: more negatives for the instance term (pair recall) per step
        "batches of 256": {"train.batch_size": 256},
    },
    "supervised-pair": {  # supervised configs: keep the label term from collapsing a label's items (pair recall)
        "defaults": {},
        "label scale 10": {"label_scale": 10.0},
        "label scale 20": {"label_scale": 20.0},
        "weight decay 0.01": {"train.weight_decay": 0.01},
        "similarity weight 10": {"similarity_weight": 10.0},
    },
    "supervised-similarity": {  # supervised configs: the similarity term's trade of labels MAP for pair recall
        "defaults": {},
        "similarity weight 3": {"similarity_weight": 3.0},
        "similarity weight 10": {"similarity_weight": 10.0},
        "similarity weight 10, label weight 50": {"similarity_weight": 10.0, "label_weight": 50.0},
    },
    "augmentation-views": {  # stage 1: which text views training swaps in for the reports (the configs: none)
        "no views (the configs)": {"augment.use_views": False},
        "extractive views": {"augment.use_views": True, "augment.generator": "extractive"},
        "grounded LLM views": {"augment.use_views": True, "augment.generator": "local"},
        "both": {"augment.use_views": True, "augment.generator": "local", "augment.also_extractive": True},
    },
    "supervised-hard-negatives": {  # supervised configs: the stage that re-weights the negatives by difficulty
        "w/o hard-negative mining": {"hard_negative_mining": False},
    },
    "supervised-label-balance": {  # supervised configs: related and unrelated pairs weigh half each in the label term
        "balanced label term": {"label_balanced": True},
    },
    "label-free": {  # the two that paid on dev, together: a soft instance term and the anatomy findings
        f"tau {tau:g}, anatomy findings weight {weight:g}": {
            "tau": tau, "train.findings_categories": ("anatomy",), "label_weight": weight,
        }
        for tau, weight in ((1.0, 20.0), (1.0, 5.0), (0.5, 20.0))
    },
    "label-free-findings-use": {  # label-free configs: the mined findings in S_ma or as false negatives
        "the config (tau 1)": {},
        "findings in S_ma, alpha 0.5": {"alpha": 0.5},
        "the same findings are not negatives": {"false_negatives": "same_labels"},
    },
    "label-free-regions": {  # label-free configs: the label term on the body regions of the mined anatomy terms
        "regions, label weight 20": {"train.findings_categories": ("region",), "label_weight": 20.0},
        "regions, label weight 20, balanced": {
            "train.findings_categories": ("region",), "label_weight": 20.0, "label_balanced": True,
        },
        "regions, label weight 5": {"train.findings_categories": ("region",), "label_weight": 5.0},
        "regions, the supervised recipe (label weight 50, similarity weight 10, tau 0.1)": {
            "train.findings_categories": ("region",), "label_weight": 50.0, "similarity_weight": 10.0, "tau": 0.1,
        },
    },
    "label-free-regions-plus": {  # label-free configs on regions (the config now): what else the findings may add
        "regions and diagnoses": {"train.findings_categories": ("region", "diagnosis")},
        "regions, extractive views": {"augment.use_views": True, "augment.generator": "extractive"},
        "regions, similarity weight 1": {"similarity_weight": 1.0},
        "regions, label weight 50": {"label_weight": 50.0},
        "regions, tau 0.5": {"tau": 0.5},
    },
    "label-free-neighbours": {  # label-free configs on regions: items with no mined region take their neighbours'
        "the config": {},
        "regions from the 10 nearest neighbours": {"train.findings_neighbours": 10},
        "regions from the 20 nearest neighbours": {"train.findings_neighbours": 20},
    },
    "similarity-weight": {  # the label-free term: codes keep the frozen features' joint cosine (0: off)
        f"similarity weight {weight:g}": {"similarity_weight": weight} for weight in (0.0, 1.0, 5.0, 20.0)
    },
}


def run_study(
    config: Path, bits: int, out: Path, study: str = "stages", seeds=(0,), on: str = "query",
    root: Path | None = None, overrides: dict | None = None,
) -> str:
    """Train and evaluate every variant of ``study`` for each seed; return (and write) the table.

    ``overrides`` (dotted keys, as ``--set``) apply to every variant, before its own switches."""
    rows = []
    for name, switches in STUDIES[study].items():
        per_seed = []
        for seed in seeds:
            switches = {k if "." in k else f"method_params.lsch.{k}": v for k, v in switches.items()}
            cfg = load_config(config, {"data.root": root, "codes.bits": (bits,), "train.seed": seed,
                                       **(overrides or {}), **switches})
            results, wall_s = trained_results(cfg, out / slug(name) / f"seed{seed}", on)
            per_seed.append((results["bits"][str(bits)], wall_s))
        rows.append((name, per_seed))
    table = study_table(rows, bits, on)
    (out / f"{study}-{on}.md").write_text(table, encoding="utf-8")
    return table


def study_table(rows, bits: int, on: str) -> str:
    """Markdown: one row per variant, mean (+- std over seeds) of each headline metric."""
    first = rows[0][1][0][0]
    protocols = [p for p in first if p != "pair"]
    metrics = [(p, d, "map@all") for p in protocols for d in ("i2t", "t2i")]
    metrics += [("pair", d, "recall@10") for d in ("i2t", "t2i")]
    n_seeds = len(rows[0][1])
    head = "| variant | " + " | ".join(f"{p} I2T | {p} T2I" for p in protocols) + " | pair R@10 I2T | pair R@10 T2I | train s |"
    lines = [
        f"MAP@all at {bits} bits ({on} split queries), pair protocol Recall@10; "
        f"mean{' +- std over ' + str(n_seeds) + ' seeds' if n_seeds > 1 else ''}",
        "", head, "|" + "---|" * (len(metrics) + 2),
    ]
    for name, per_seed in rows:
        cells = []
        for p, d, m in metrics:
            values = np.array([r[p][d][m] for r, _ in per_seed])
            cells.append(f"{values.mean():.3f}" + (f" +- {values.std(ddof=1):.3f}" if n_seeds > 1 else ""))
        train_s = np.mean([t for _, t in per_seed])
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {train_s:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--bits", type=int, default=64)
    parser.add_argument("--study", choices=sorted(STUDIES), default="stages")
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds, e.g. 0,1,2")
    parser.add_argument("--on", choices=("query", "dev"), default="query", help="dev: tune without the queries")
    parser.add_argument("--root", type=Path)
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="a config value for every variant, e.g. --set method_params.lsch.use_llm=false")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    seeds = tuple(int(s) for s in args.seeds.split(","))
    print(run_study(args.config, args.bits, args.out, args.study, seeds, args.on, args.root,
                    parse_assignments(args.set)))


if __name__ == "__main__":
    main()
