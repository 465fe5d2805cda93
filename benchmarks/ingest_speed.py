"""Index throughput vs the encoders alone: what hashing and the Milvus upsert add to ingestion.

On the first ``--items`` items of the run's dataset, read from their files (images decoded, reports
as stored), in batches, in this process:

- **encoders alone**: image bytes -> v^x and report -> v^y (backbones + the LSCH branches);
- **indexing**: the same, then codes at every trained length and ``CodeIndex.upsert`` of both
  modalities into a new milvus-lite file, timed per stage.

Both passes run on the same items after one warm-up batch; the ratio of their items/s comes from one run.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from medhash.services.data.item import Dataset, Item
from medhash.services.run_dir import RunDir


@dataclass
class IngestTiming:
    """Seconds spent per stage over ``items`` items."""

    items: int
    stages: dict[str, float] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return sum(self.stages.values())

    @property
    def items_per_s(self) -> float:
        return self.items / self.seconds if self.seconds > 0 else float("nan")


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("speed-ingest", help="index throughput (items/s) vs the encoders alone")
    parser.add_argument("--run", type=Path, required=True, help="run directory written by `medhash train`")
    parser.add_argument("--root", type=Path, help="dataset folder, if it moved since training")
    parser.add_argument("--items", type=int, default=200, help="items to encode and index (default 200)")
    parser.add_argument("--batch-size", type=int, default=16, help="items per batch (default 16)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medhash.services.data import open_dataset
    from medhash.services.errors import ConfigError

    if args.items < 1 or args.batch_size < 1:
        raise ConfigError("need --items >= 1 and --batch-size >= 1")
    run_dir = RunDir(args.run)
    dataset = open_dataset(run_dir.data_config(root=args.root))
    encoders, indexing = measure_ingest_speed(run_dir, dataset, args.items, args.batch_size)
    print(format_report(encoders, indexing, args.batch_size))
    return 0


def measure_ingest_speed(run: RunDir, dataset: Dataset, n_items: int = 200, batch_size: int = 16
                         ) -> tuple[IngestTiming, IngestTiming]:
    """(encoders alone, indexing) timings on the first ``n_items`` items of ``dataset`` with an image and a report."""
    import torch

    from medhash.serving.app import index_settings
    from medhash.serving.config import ServeConfig
    from medhash.serving.pipeline import Pipeline
    from medhash.services.index import open_index

    serve = ServeConfig()  # the defaults the Serve app runs with
    torch.set_num_threads(serve.torch_threads)  # as one Serve replica has
    pipeline = Pipeline.load(run, serve.max_image_pixels, serve.max_text_chars)
    items = [item for item in dataset.items if item.image_paths and item.report.strip()][:n_items]
    batches = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    encode(pipeline, batches[0], IngestTiming(0))  # warm-up: first-call allocations and lazy loads
    encoders = IngestTiming(len(items))
    for batch in batches:
        encode(pipeline, batch, encoders)
    indexing = IngestTiming(len(items))
    with tempfile.TemporaryDirectory(prefix="medhash-ingest-") as tmp:
        index = open_index(index_settings(run.config().index, str(Path(tmp) / "bench.db")), pipeline.hasher.bits)
        try:
            for batch in batches:
                ingest(pipeline, index, batch, encode(pipeline, batch, indexing), indexing)
            if any(index.count(bits) != 2 * len(items) for bits in pipeline.hasher.bits):
                raise RuntimeError("the index does not hold every item of the benchmark")
        finally:
            index.close()
    return encoders, indexing


def encode(pipeline, batch: list[Item], timing: IngestTiming) -> dict:
    """v of each modality for ``batch``, read from its files; adds to the timing's read / encode stages."""
    start = time.perf_counter()
    images = [item.image_paths[0].read_bytes() for item in batch]
    names = [item.image_paths[0].name for item in batch]
    texts = [item.report for item in batch]
    read = time.perf_counter()
    vectors = {"image": pipeline.image(images, names), "text": pipeline.text(texts)}
    done = time.perf_counter()
    timing.stages["read files"] = timing.stages.get("read files", 0.0) + read - start
    timing.stages["encode"] = timing.stages.get("encode", 0.0) + done - read
    return vectors


def ingest(pipeline, index, batch: list[Item], vectors: dict, timing: IngestTiming) -> None:
    """Hash ``vectors`` at every code length and upsert both modalities; adds the hash / upsert stages."""
    from medhash.serving.ingest import item_records

    for bits in pipeline.hasher.bits:
        start = time.perf_counter()
        records = [r for m, v in vectors.items() for r in item_records(batch, m, pipeline.hasher(v, bits))]
        hashed = time.perf_counter()
        index.upsert(bits, records)
        timing.stages["hash"] = timing.stages.get("hash", 0.0) + hashed - start
        timing.stages["upsert"] = timing.stages.get("upsert", 0.0) + time.perf_counter() - hashed


def format_report(encoders: IngestTiming, indexing: IngestTiming, batch_size: int) -> str:
    """The per-stage table, both throughputs and their ratio."""
    lines = [
        f"{indexing.items} items (image + report each), batches of {batch_size}; "
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end",
        "",
        "| pass | " + " | ".join(f"{s} s" for s in indexing.stages) + " | total s | items/s |",
        "|---|" + "---:|" * (len(indexing.stages) + 2),
    ]
    for name, timing in (("encoders alone", encoders), ("indexing", indexing)):
        cells = [f"{timing.stages[s]:.2f}" if s in timing.stages else "-" for s in indexing.stages]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {timing.seconds:.2f} | {timing.items_per_s:.1f} |")
    lines += ["", f"Index throughput / encoders alone: {indexing.items_per_s / encoders.items_per_s:.2f}"]
    return "\n".join(lines)
