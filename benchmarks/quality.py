"""`medhash bench quality`: every method trained and evaluated on the same split and features, over seeds.

Each (method, seed) is a run directory trained through the same Ray Train entry point as
`medhash train` and evaluated by `medhash eval` (query split against train + dev). LSCH uses its
dataset config; every other method the dataset's baseline config (no augmented views: the same
frozen features LSCH starts from), with ``method`` set. Writes, for each protocol of
docs/evaluation.md, a Markdown table in the papers' layout (methods x {I2T, T2I} x bits, MAP@all
mean +- std over seeds; the pair protocol as Recall@10), ``quality.csv`` (every number of every
seed) and ``map_vs_bits.png``. Finished runs are reused, so an interrupted comparison resumes.
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

from medhash.services.cli import code_lengths

DEFAULT_METHODS = ("lsch", "msach", "dcmh", "dchmt", "dhaph", "ucch", "cca-itq", "float-dual")
UPPER_BOUND = "float-dual"  # reported from its float (cosine) embeddings, not its codes
CONFIGS = Path(__file__).resolve().parents[1] / "training" / "configs"
DIRECTIONS = ("i2t", "t2i")


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("quality", help="every hashing method on the same features: MAP tables over seeds")
    parser.add_argument("--dataset", required=True, choices=["medpix2", "covid-cxr"])
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated (default: all)")
    parser.add_argument("--bits", type=code_lengths, default=(32, 64, 128), help="code lengths (default 32,64,128)")
    parser.add_argument("--seeds", default="0,1,2", help="training seeds (default 0,1,2)")
    parser.add_argument("--lsch-config", type=Path, help="LSCH's config (default training/configs/<dataset>-lsch.yaml)")
    parser.add_argument("--baseline-config", type=Path, help="the baselines' config (default <dataset>-baselines.yaml)")
    parser.add_argument("--root", type=Path, help="dataset folder")
    parser.add_argument("--split-file", type=Path, help="CSV id,split (e.g. an evaluator's own case-level split) for every run")
    parser.add_argument("--out", type=Path, required=True, help="folder for the runs, tables, CSV and plot")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medhash.services.errors import ConfigError
    from medhash.services.registry import method_names

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in method_names()]
    if unknown or not methods:
        raise ConfigError(f"unknown methods {unknown}; known: {', '.join(method_names())}")
    bits = args.bits
    seeds = tuple(int(s) for s in args.seeds.split(","))
    configs = {
        "lsch": args.lsch_config or CONFIGS / f"{args.dataset}-lsch.yaml",
        "baselines": args.baseline_config or CONFIGS / f"{args.dataset}-baselines.yaml",
    }
    print(compare(methods, bits, seeds, configs, args.out, args.root, args.split_file))
    return 0


def compare(methods, bits, seeds, configs: dict[str, Path], out: Path, root: Path | None = None,
            split_file: Path | None = None) -> str:
    """Train and evaluate every (method, seed), on ``split_file``'s split when given; write and return the tables."""
    from medhash.benchmarks.runs import trained_results
    from medhash.services.config import load_config

    rows = []  # (method, seed, results, train seconds)
    for method in methods:
        for seed in seeds:
            path = configs["lsch"] if method == "lsch" else configs["baselines"]
            cfg = load_config(path, {"data.root": root, "data.split_file": split_file, "codes.bits": bits,
                                     "train.seed": seed, "method": method})
            results, wall_s = trained_results(cfg, out / method / f"seed{seed}")
            rows.append((method, seed, results, wall_s))
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "quality.csv")
    plot_map_vs_bits(rows, bits, out / "map_vs_bits.png")
    report = tables(rows, bits, methods)
    (out / "quality.md").write_text(report, encoding="utf-8")
    return report


def scores(results: dict, method: str, bits: int) -> dict:
    """protocol -> direction -> metric of one run at one code length (the upper bound: its float embeddings)."""
    return results["float"] if method == UPPER_BOUND else results["bits"][str(bits)]


def headline(protocol: str) -> str:
    return "recall@10" if protocol == "pair" else "map@all"


def tables(rows, bits, methods) -> str:
    """One Markdown table per protocol, LSCH's relative gain over the best baseline, wall times."""
    protocols = [p for p in rows[0][2]["float"]]
    values = {}  # (method, protocol, direction, bits) -> values over seeds
    for method, _, results, _ in rows:
        for protocol in protocols:
            for d in DIRECTIONS:
                for b in bits:
                    values.setdefault((method, protocol, d, b), []).append(scores(results, method, b)[protocol][d][headline(protocol)])
    seeds = {m: sum(r[0] == m for r in rows) for m in methods}
    over = f"{seeds[methods[0]]} seeds" if len(set(seeds.values())) == 1 else "the seeds listed below"
    lines = []
    for protocol in protocols:
        lines += [
            f"### {protocol} protocol: {headline(protocol)}, mean +- std over {over}", "",
            "| method | " + " | ".join(f"I2T {b}" for b in bits) + " | " + " | ".join(f"T2I {b}" for b in bits) + " |",
            "|---|" + "---:|" * (2 * len(bits)),
        ]
        for method in methods:
            name = f"{method} (float, cosine)" if method == UPPER_BOUND else method
            cells = [_mean_std(values[(method, protocol, d, b)]) for d in DIRECTIONS for b in bits]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines += ["", *_gains(values, protocol, bits, methods), ""]
    wall = {m: np.mean([w for mm, _, _, w in rows if mm == m]) for m in methods}
    lines.append("Training wall time per run (mean over seeds): " + ", ".join(f"{m} {wall[m]:.0f} s" for m in methods) + ".")
    if len(set(seeds.values())) > 1:
        lines.append("Seeds per method: " + ", ".join(f"{m} {n}" for m, n in seeds.items()) + ".")
    return "\n".join(lines) + "\n"


def _gains(values, protocol, bits, methods) -> list[str]:
    """LSCH's relative gain over the best hashing baseline (the float upper bound excluded)."""
    baselines = [m for m in methods if m not in ("lsch", UPPER_BOUND)]
    if "lsch" not in methods or not baselines:
        return []
    parts = []
    for d in DIRECTIONS:
        for b in bits:
            best = max(baselines, key=lambda m: np.mean(values[(m, protocol, d, b)]))
            ours, theirs = values[("lsch", protocol, d, b)], values[(best, protocol, d, b)]
            gain = f"{100 * (np.mean(ours) - np.mean(theirs)) / np.mean(theirs):+.1f}% vs {best}"
            if abs(np.mean(ours) - np.mean(theirs)) <= max(_std(ours), _std(theirs)):
                gain += " (within the seed spread: no difference)"
            parts.append(f"{d.upper()} {b}: {gain}")
    return ["LSCH vs the best hashing baseline: " + "; ".join(parts) + "."]


def _std(v: list[float]) -> float:
    return float(np.std(v, ddof=1)) if len(v) > 1 else 0.0


def _mean_std(v: list[float]) -> str:
    return f"{np.mean(v):.3f} +- {_std(v):.3f}" if len(v) > 1 else f"{v[0]:.3f}"


def write_csv(rows, path: Path) -> None:
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["method", "seed", "codes", "protocol", "direction", "metric", "value", "train_s"])
        for method, seed, results, wall_s in rows:
            for codes, by_protocol in [("float", results["float"]), *results["bits"].items()]:
                for protocol, by_direction in by_protocol.items():
                    for direction, metrics in by_direction.items():
                        for metric, value in metrics.items():
                            writer.writerow([method, seed, codes, protocol, direction, metric, value, wall_s])


def plot_map_vs_bits(rows, bits, path: Path) -> None:
    """Labels-protocol MAP@all against code length, one line per method, I2T and T2I side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(m for m, *_ in rows))
    figure, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for axis, d in zip(axes, DIRECTIONS):
        for method in methods:
            runs = [r for m, _, r, _ in rows if m == method]
            means = [np.mean([scores(r, method, b)["labels"][d]["map@all"] for r in runs]) for b in bits]
            axis.plot(bits, means, marker="o", linestyle="--" if method == UPPER_BOUND else "-", label=method)
        axis.set(title=d.upper(), xlabel="bits", xticks=list(bits))
    axes[0].set_ylabel("MAP@all (labels protocol)")
    axes[1].legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
