"""The LSCH ablation: each stage switched off in turn, same data, split, schedule and seed.

    python -m benchmarks.ablation --config training/configs/medpix2-lsch.yaml --bits 64 --out runs/ablation

trains the full model and one variant per switch through the same Ray Train entry point, evaluates
each by the three protocols and writes ``ablation.md`` (MAP@all I2T / T2I per protocol, pair R@10).
Finished variants are skipped, so an interrupted study resumes.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from services.config import load_config
from services.featureset import build_featureset
from services.run_dir import RunDir
from training.evaluate import evaluate_run
from training.trainer import train

VARIANTS = {
    "LSCH (full)": {},
    "w/o augmentation": {"use_augmentation": False},
    "w/o structured encoding": {"use_structured_encoding": False},
    "w/o soft prompt": {"use_soft_prompt": False},
    "w/o hard prompt": {"use_hard_prompt": False},
    "w/o GBRBM (sign of linear)": {"use_gbrbm": False},
    "w/o hard-negative mining": {"hard_negative_mining": False},
    "w/o LLM (linear pooling)": {"use_llm": False},
}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def run_ablation(config: Path, bits: int, out: Path, root: Path | None = None) -> str:
    rows = []
    for name, switches in VARIANTS.items():
        cfg = load_config(config, data={"root": root}, lsch={"bits": (bits,), **switches})
        run_path, eval_path = out / slug(name), out / slug(name) / "eval"
        if not RunDir(run_path).is_complete():
            train(cfg, run_path, build_featureset(cfg, progress=False))
        results_file = eval_path / "results.json"
        results = (
            json.loads(results_file.read_text()) if results_file.is_file() else evaluate_run(run_path, eval_path)
        )
        rows.append((name, results["bits"][str(bits)], RunDir(run_path).meta()["wall_time_s"]))
    table = ablation_table(rows, bits)
    (out / "ablation.md").write_text(table, encoding="utf-8")
    return table


def ablation_table(rows, bits: int) -> str:
    protocols = [p for p in rows[0][1] if p != "pair"]
    head = "| variant | " + " | ".join(f"{p} I2T | {p} T2I" for p in protocols) + " | pair R@10 I2T | pair R@10 T2I | train s |"
    lines = [f"MAP@all at {bits} bits (query split), pair protocol Recall@10", "", head,
             "|" + "---|" * (2 * len(protocols) + 4)]
    for name, r, train_s in rows:
        cells = [f"{r[p][d]['map@all']:.3f}" for p in protocols for d in ("i2t", "t2i")]
        cells += [f"{r['pair'][d]['recall@10']:.3f}" for d in ("i2t", "t2i")]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {train_s:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--bits", type=int, default=64)
    parser.add_argument("--root", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    print(run_ablation(args.config, args.bits, args.out, args.root))


if __name__ == "__main__":
    main()
