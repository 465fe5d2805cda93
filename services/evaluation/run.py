"""`medhash eval`: every protocol of docs/evaluation.md for a run directory, codes saved for re-checking.

Writes to the output folder: ``results.json`` (protocol -> direction -> metric, for each code length
and for the unhashed float embeddings), ``results.md`` (the headline table), ``codes_<bits>.npz``
(packed codes, ids and labels: anyone can recompute the metrics) and ``pr_<bits>.png``.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from medhash.services.codes import code_health, hamming_distances, save_codes_npz
from medhash.services.config import override
from medhash.services.errors import ConfigError
from medhash.services.evaluation.protocols import evaluate, reference_maps
from medhash.services.features.featureset import FeatureSet, build_featureset
from medhash.services.methods import embed, hash_codes, load_trained
from medhash.services.evaluation.metrics import pr_curve_by_radius, protocol_relevance
from medhash.services.run_dir import RunDir

log = logging.getLogger(__name__)


def evaluate_run(
    run_path: Path, out: Path, split_file: Path | None = None, root: Path | None = None,
    features: FeatureSet | None = None, on: str = "query", judgments: Path | None = None,
) -> dict:
    """Evaluate the run in ``run_path`` on its dataset (optionally another split or data location).

    ``on`` "query" ranks the query split against the database (train + dev): the published numbers.
    ``on`` "dev" ranks the dev split against train only, so settings can be tuned without the queries.
    ``judgments``: an SQLite judgments file or its CSV export, scored as well (``results["judgments"]``).
    """
    run = RunDir(run_path)
    cfg = run.config()
    given = {f"data.{k}": v for k, v in {"split_file": split_file, "root": root}.items() if v is not None}
    cfg = override(cfg, given)
    features = features or build_featureset(cfg)
    if cfg.train.supervision == "labels" and list(features.label_names) != run.label_names():
        raise ConfigError(f"{run_path}: the dataset's label list differs from the one the run was trained on")
    if on not in ("query", "dev"):
        raise ConfigError(f"evaluate on 'query' or 'dev', not {on!r}")
    query = features.rows(on)
    db = np.flatnonzero(features.splits != "query") if on == "query" else features.rows("train")
    if not len(query):
        raise ConfigError(f"{features.dataset}: the {on} split is empty")

    _, model = load_trained(run)
    v = embed(model, features.image, features.text)
    v_query = {m: x[query] for m, x in v.items()}
    v_db = {m: x[db] for m, x in v.items()}
    labels = dict(
        query_labels=features.labels[query], db_labels=features.labels[db], label_names=features.label_names
    )
    results: dict = {
        "dataset": features.dataset,
        "on": on,
        "queries": int(len(query)),
        "database": int(len(db)),
        "references": reference_maps(
            features.labels[query], features.labels[db], features.labels[features.rows("train")], features.label_names
        ),
        "float": evaluate("cosine", v_query, v_db, **labels, query_groups=features.groups[query]),
        "bits": {},
        "code_health": {},  # per code length: database bits constant per modality, and split by modality
    }
    out.mkdir(parents=True, exist_ok=True)
    for bits in model.bits:
        c_query, c_db = hash_codes(model, v_query, bits), hash_codes(model, v_db, bits)
        results["bits"][str(bits)] = evaluate("hamming", c_query, c_db, **labels, query_groups=features.groups[query])
        results["code_health"][str(bits)] = code_health(c_db["image"], c_db["text"], bits)
        save_codes_npz(
            out / f"codes_{bits}.npz", query_img=c_query["image"], query_txt=c_query["text"], db_img=c_db["image"],
            db_txt=c_db["text"], query_ids=features.ids[query], db_ids=features.ids[db], **labels,
        )
        plot_pr_curves(c_query, c_db, labels, bits, out / f"pr_{bits}.png")
    if judgments is not None:
        results["judgments"] = _judgment_scores(cfg, model, features, v, Path(judgments))
    (out / "results.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    (out / "results.md").write_text(results_table(results), encoding="utf-8")
    log.info("evaluation written to %s", out)
    return results


def _judgment_scores(cfg, model, features: FeatureSet, v: dict, path: Path) -> dict:
    """Every code length scored against the judgments in ``path`` over all the run's items."""
    from medhash.services.data import open_dataset
    from medhash.services.evaluation.judgments import score_judgments
    from medhash.services.judgments import fingerprint, read_judgments

    judgments = read_judgments(path)
    rows = {str(item_id): row for row, item_id in enumerate(features.ids)}
    fingerprints = {}
    for item in open_dataset(cfg.data).items:
        if item.id in rows:
            fingerprints[("text", fingerprint(item.report))] = rows[item.id]
            for image in item.image_paths:
                fingerprints[("image", fingerprint(Path(image).read_bytes()))] = rows[item.id]
    scores = {str(bits): score_judgments(judgments, fingerprints, features.ids, hash_codes(model, v, bits))
              for bits in model.bits}
    return {"file": str(path), "bits": scores}


def results_table(results: dict) -> str:
    """Markdown: one row per code length (and float), MAP@all I2T / T2I per protocol, pair R@10."""
    protocols = [p for p in results["float"] if p != "pair"]
    head = "| codes | " + " | ".join(f"{p} I2T | {p} T2I" for p in protocols) + " | pair R@10 I2T | pair R@10 T2I |"
    lines = [head, "|" + "---|" * (2 * len(protocols) + 3)]
    rows = [(f"{b} bits", r) for b, r in results["bits"].items()] + [("float (cosine)", results["float"])]
    for name, r in rows:
        cells = [f"{r[p][d]['map@all']:.3f}" for p in protocols for d in ("i2t", "t2i")]
        cells += [f"{r['pair'][d].get('recall@10', float('nan')):.3f}" for d in ("i2t", "t2i")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    floors = "; ".join(
        f"{p}: random {r['random']:.3f}, one-list label prior {r['label_prior']:.3f}"
        for p, r in results["references"].items()
    )
    return (
        f"{results['dataset']}: {results['queries']} queries, {results['database']} database items; "
        "MAP@all by Hamming ranking (ties by database index)\n\n" + "\n".join(lines)
        + f"\n\nReference floors (no model): {floors}\n" + code_health_line(results.get("code_health"))
        + judgments_table(results.get("judgments"))
    )


def code_health_line(health: dict | None) -> str:
    """Markdown: per code length, the database bits constant over the image / text codes and split by modality."""
    if not health:
        return ""
    counts = "; ".join(f"{bits} bits: {h['constant_image']} / {h['constant_text']}, {h['modality_split']} split"
                       for bits, h in health.items())
    return f"\nBits constant over the database (image / text codes) and split by modality: {counts}\n"


def judgments_table(judged: dict | None) -> str:
    """Markdown of the scores against human judgments (empty without them)."""
    if not judged:
        return ""
    first = next(iter(judged["bits"].values()))
    lines = [f"\nHuman judgments ({judged['file']}): {first['judgments']} judgments of {first['judged_hits']} hits; "
             f"{first['queries']['resolved']} queries found in the dataset, {first['queries']['unresolved']} not "
             "(uploads or texts that are no dataset item)\n",
             "| codes | direction | queries | MAP@judged | P@1 | P@5 | P@10 |", "|---|---|---:|---:|---:|---:|---:|"]
    for bits, scores in judged["bits"].items():
        for direction, m in scores["directions"].items():
            lines.append(f"| {bits} bits | {direction.upper()} | {m['queries']} | {m['map@judged']:.3f} | "
                         f"{m['p@1']:.3f} | {m['p@5']:.3f} | {m['p@10']:.3f} |")
    if not first["directions"]:
        lines.append("| - | - | 0 | no scored query: none with a relevant hit that is a dataset item | | | |")
    return "\n".join(lines) + "\n"


def plot_pr_curves(c_query: dict, c_db: dict, labels: dict, bits: int, path: Path) -> None:
    """Precision-recall by Hamming radius, labels protocol, I2T and T2I."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    relevant = protocol_relevance("labels", labels["query_labels"], labels["db_labels"], labels["label_names"])
    fig, ax = plt.subplots(figsize=(5, 4))
    for name, (a, b) in {"I2T": ("image", "text"), "T2I": ("text", "image")}.items():
        _, precision, recall = pr_curve_by_radius(hamming_distances(c_query[a], c_db[b]), relevant, bits)
        ax.plot(recall, precision, marker=".", label=name)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(f"PR by Hamming radius, {bits} bits (labels protocol)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
