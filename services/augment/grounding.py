"""Grounded views: an LLM-written view keeps only the sentences its source supports.

The source of a view is what the prompt showed of the item (:func:`source_text`: imaging line, history,
findings, impression). A generated sentence is kept when

- every finding it states (:mod:`medhash.services.findings`, negation-aware) is stated by the source with
  the same polarity: a finding the source never mentions, or one it states as absent, drops the sentence;
- every content word it uses occurs in the source (numbers included; plural and singular count as one),
  besides English stop words and the few connective words of :data:`CONNECTIVES` ("shows",
  "consistent"): a made-up finding outside the lexicon ("hypoechoic", "occlusion") drops it too;
- it states something: at least one content word.

So a kept view copies its facts from the source, in the model's own arrangement. A view with no kept
sentence is dropped. :class:`TemplateGrounding` counts, per template, the views kept and dropped and why,
and the groundedness rate: the share of the findings the model wrote that the source supports.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from functools import cache

from medhash.services.augment.generators import sentences
from medhash.services.augment.templates import prompt_fields
from medhash.services.data.item import Item
from medhash.services.findings import FindingMiner, MinedText

# words that arrange facts without stating one (the templates' answer cues use them)
CONNECTIVES = frozenset({
    "shows", "show", "showing", "shown", "demonstrates", "demonstrate", "demonstrating", "demonstrated",
    "reveals", "reveal", "revealing", "revealed", "depicts", "depicting", "noted", "seen", "visible",
    "consistent", "compatible", "suggestive", "suggesting", "suggests", "indicating", "indicates",
    "support", "supports", "supporting", "findings", "finding", "diagnosis", "image", "images", "imaging",
    "patient", "report", "study", "key", "relevant", "facts", "description", "medical", "view",
})
UNSUPPORTED, FLIPPED, NEW_WORDS = "a finding the source does not state", "a negation flipped", "words not in the source"
STATES_NOTHING = "states nothing"  # no content word: "The."
EMPTY, NOTHING_KEPT = "empty generation", "no sentence grounded in the source"
_WORD = re.compile(r"[a-z0-9]+")


def source_text(item: Item) -> str:
    """What the templates show of ``item``: its fields except the generated image description."""
    return "\n".join(v for k, v in prompt_fields(item).items() if k != "Image description" and v.strip())


@dataclass(frozen=True)
class Source:
    """A view's source, mined once: its findings and the keys of its words."""

    mined: MinedText
    words: frozenset[str]

    @classmethod
    def of(cls, text: str, miner: FindingMiner) -> Source:
        return cls(miner.mine(text), frozenset(_key(w) for w in _WORD.findall(text.lower())))


@dataclass(frozen=True)
class Verdict:
    """One generated view checked against its source."""

    text: str  # the kept sentences ('' when the view is dropped)
    dropped: tuple[tuple[str, str], ...]  # (sentence, reason) of every dropped sentence
    findings: int  # findings the view states
    grounded: int  # of which the source supports
    reason: str | None = None  # why the whole view is dropped (None: kept)


def verify(view: str, source: Source, miner: FindingMiner) -> Verdict:
    """``view`` cut to the sentences ``source`` supports (module docstring)."""
    if not view.strip():
        return Verdict("", (), 0, 0, EMPTY)
    kept, dropped, findings, grounded = [], [], 0, 0
    for sentence in sentences(view):
        mined = miner.mine(sentence)
        problems = []
        for term, negated in sorted({(m.term, m.negated) for m in mined.mentions}):  # sorted: stable reasons
            findings += 1
            problem = _finding_problem(term, negated, source.mined)
            grounded += problem is None
            if problem:
                problems.append(problem)
        words = [w for w in _WORD.findall(sentence.lower()) if _content(w)]
        new_words = [w for w in words if _key(w) not in source.words]
        if new_words:
            problems.append(f"{NEW_WORDS}: {', '.join(dict.fromkeys(new_words))}")
        if not words and not mined.mentions:
            problems.append(STATES_NOTHING)
        if problems:
            dropped.append((sentence, "; ".join(problems)))
        else:
            kept.append(sentence)
    return Verdict(" ".join(kept), tuple(dropped), findings, grounded, None if kept else NOTHING_KEPT)


def _finding_problem(term: str, negated: bool, source: MinedText) -> str | None:
    """Why the source does not support ``term`` stated as absent (``negated``) or present; None: it does."""
    polarities = {m.negated for m in source.mentions if m.term == term}
    if not polarities:
        return f"{UNSUPPORTED}: {term}"
    if negated not in polarities:
        return f"{FLIPPED}: {term}"
    return None


def _content(word: str) -> bool:
    return (len(word) >= 3 or word.isdigit()) and word not in _stop_words() and word not in CONNECTIVES


@cache
def _stop_words() -> frozenset[str]:
    """spaCy's English stop words (imported on first use: spaCy is slow to import)."""
    from spacy.lang.en.stop_words import STOP_WORDS

    return frozenset(STOP_WORDS)


def _key(word: str) -> str:
    """One key for a word's singular and plural."""
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith("es") and len(word) > 4 and word[-3] in "sxz":
        return word[:-2]
    if word.endswith("s") and not word.endswith("ss") and len(word) > 3:
        return word[:-1]
    return word


@dataclass
class TemplateGrounding:
    """One template's counts over a run: views kept, dropped by reason, sentences dropped, findings."""

    kept: int = 0
    kept_in_part: int = 0  # kept, with some sentences dropped
    dropped: Counter = field(default_factory=Counter)  # reason -> views
    dropped_sentences: Counter = field(default_factory=Counter)  # first reason kind -> sentences
    findings: int = 0
    grounded: int = 0

    def add(self, verdict: Verdict) -> None:
        self.findings += verdict.findings
        self.grounded += verdict.grounded
        for _, reason in verdict.dropped:
            self.dropped_sentences[reason.split(":")[0]] += 1
        if verdict.reason:
            self.dropped[verdict.reason] += 1
        else:
            self.kept += 1
            self.kept_in_part += bool(verdict.dropped)

    @property
    def rate(self) -> float | None:
        """Share of the written findings the source supports (None: no finding written)."""
        return self.grounded / self.findings if self.findings else None

    def line(self, name: str) -> str:
        rate = "no findings written" if self.rate is None else f"{self.rate:.0%} of {self.findings:,} findings grounded"
        dropped = ", ".join(f"{n:,} {reason}" for reason, n in self.dropped.most_common()) or "none"
        sentences_dropped = ", ".join(f"{n:,} {kind}" for kind, n in self.dropped_sentences.most_common()) or "none"
        return (f"{name}: {self.kept:,} views kept ({self.kept_in_part:,} in part), dropped: {dropped}; "
                f"sentences dropped: {sentences_dropped}; {rate}")
