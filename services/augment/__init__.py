"""LSCH stage 1: extra text views of each pair from three prompt templates, generated once and cached.

:func:`augment_dataset` fills the templates for every item, answers what the cache holds and
generates the rest. The cache keeps what the generator wrote; an LLM's views then keep only the
sentences their source supports (:mod:`.grounding`), checked on every run, so a change of the rules
never needs the LLM again.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from medhash.services.augment.cache import AugmentCache, Record, cache_path, prompt_hash
from medhash.services.augment.generators import Generator, generator_key, make_generator
from medhash.services.augment.grounding import Source, TemplateGrounding, source_text, verify
from medhash.services.augment.templates import TEMPLATES, acquisition, prompt_fields
from medhash.services.config import AugmentConfig, LLMConfig
from medhash.services.data.item import Dataset, Item
from medhash.services.data.text import summarize
from medhash.services.findings import FindingMiner

log = logging.getLogger(__name__)

Augmentations = dict[str, dict[str, str]]  # item id -> template name -> text


@dataclass
class AugmentRun:
    """What one run produced: the texts, how many were generated or cached, the bad items, and per
    template how the LLM's views fared against their sources (empty for the extractive generator)."""

    texts: Augmentations
    cache_path: Path
    generated: int = 0
    cached: int = 0
    problems: list[str] = field(default_factory=list)
    grounding: dict[str, TemplateGrounding] = field(default_factory=dict)


def augment_dataset(dataset: Dataset, cfg: AugmentConfig, llm_cfg: LLMConfig, progress: bool = True) -> Augmentations:
    """Item id -> template name -> text for ``cfg.templates``, generating only what is not cached.

    Items that could not be augmented are logged as warnings.
    """
    run = run_augmentation(dataset, cfg, llm_cfg, progress=progress)
    for problem in run.problems:
        log.warning(problem)
    return run.texts


def run_augmentation(dataset: Dataset, cfg: AugmentConfig, llm_cfg: LLMConfig, progress: bool = True,
                     generator: Generator | None = None) -> AugmentRun:
    """:func:`augment_dataset` with counts and problems; ``generator`` replaces the configured one.

    Templates run in a fixed order, image description first, because joint reasoning is given the
    description of the same run (or, when that template is not selected, the item's acquisition line).
    Items without report text are reported and skipped, as are empty generations (not cached, so a
    later run retries them). A generator that does not copy its source has every view verified.
    """
    key = generator.key if generator else generator_key(cfg, llm_cfg)
    checked = not (generator.copies_source if generator else cfg.generator == "extractive")
    cache = AugmentCache(cache_path(dataset.name, key))
    run = AugmentRun(texts={}, cache_path=cache.path)
    miner, sources = (FindingMiner(), {}) if checked else (None, None)

    def take(item: Item, name: str, text: str) -> None:
        if checked:
            if item.id not in sources:
                sources[item.id] = Source.of(source_text(item), miner)
            verdict = verify(text, sources[item.id], miner)
            run.grounding.setdefault(name, TemplateGrounding()).add(verdict)
            text = verdict.text
        if text:
            run.texts.setdefault(item.id, {})[name] = text
    items = [item for item in dataset.items if item.report.strip()]
    if len(items) < len(dataset.items):
        no_text = [item.id for item in dataset.items if not item.report.strip()]
        run.problems.append(summarize("items without report text, skipped", no_text))
    names = [name for name in TEMPLATES if name in cfg.templates]
    with tqdm(total=len(items) * len(names), desc=f"augment {dataset.name}", unit="text", disable=not progress) as bar:
        for name in names:
            for start in range(0, len(items), cfg.batch_size):
                batch = items[start:start + cfg.batch_size]
                prompts = [TEMPLATES[name].fill(prompt_fields(item, description(run.texts, item))) for item in batch]
                missing = []
                for item, prompt in zip(batch, prompts):
                    text = cache.lookup(item.id, name, TEMPLATES[name].version, prompt_hash(prompt))
                    if text is None:
                        missing.append((item, prompt))
                    else:
                        take(item, name, text)
                        run.cached += 1
                if missing:
                    generator = generator or make_generator(cfg, llm_cfg)
                    outputs = generator.generate([prompt for _, prompt in missing])
                    for (item, prompt), text in zip(missing, outputs):
                        if not text.strip():
                            run.problems.append(f"item {item.id}: empty {name} generation, not cached")
                            continue
                        cache.add(Record(item.id, name, TEMPLATES[name].version, key, prompt_hash(prompt), text))
                        run.generated += 1
                        take(item, name, text)
                bar.update(len(batch))
    return run


def description(texts: Augmentations, item: Item) -> str:
    """The image description joint reasoning is given: this run's, else the acquisition line."""
    return texts.get(item.id, {}).get("image_description") or acquisition(item)
