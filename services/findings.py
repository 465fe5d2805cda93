"""Mined findings: the diagnosis, finding and anatomy terms a report states, negation-aware.

A spaCy pipeline without a statistical model (so it needs no download): a sentence splitter, a phrase
matcher over the radiology lexicon in ``findings_lexicon.yaml`` (case-insensitive, longest match wins,
every spelling mapped to one canonical term), and negspacy's NegEx with its clinical termset, extended
by the radiology phrases that state absence ("no evidence of", "not seen") or leave it open ("cannot
be excluded": a possibility, so not negated). Anatomy is never negated ("no fracture of the femur"
still concerns the femur).

A text that yields nothing says why (:data:`REASONS`), so a report that is empty, not English (py3langid),
or only boilerplate gets a counted reason, never an invented finding. Mining is pure text processing, about
1 ms per MedPix caption on one core (2,050 in 1.7 s): reports are mined when needed rather than cached.

:func:`explain` says why search hits came back: the findings each hit shares with the query.
"""
from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from math import ceil
from pathlib import Path

import numpy as np
import yaml

log = logging.getLogger(__name__)
LEXICON = Path(__file__).with_name("findings_lexicon.yaml")
CATEGORIES = ("diagnosis", "finding", "anatomy")  # the order findings are listed in
REGION = "region"  # the body region a report images: a coarser category label-free runs may train on
NEGATABLE = ("diagnosis", "finding")
EMPTY, NOT_ENGLISH, NO_TERMS = "empty", "not English", "no finding terms (boilerplate or wording the lexicon lacks)"
REASONS = (EMPTY, NOT_ENGLISH, NO_TERMS)
# A text is judged "not English" when most of its letters are not Latin, or when it has at least
# MIN_WORDS_FOR_LANGUAGE words and py3langid, choosing among LANGUAGES, names another language with
# probability >= MIN_LANGUAGE_CONFIDENCE. Latin is left out of LANGUAGES and short texts are not judged:
# on MedPix, terse English captions ("Joint effusion", "Situs inversus.") otherwise read as French or Latin.
MIN_WORDS_FOR_LANGUAGE = 4
MIN_LANGUAGE_CONFIDENCE = 0.75
LANGUAGES = ("en", "es", "fr", "de", "it", "pt", "nl", "sv", "da", "no", "pl", "cs", "ru", "uk", "tr", "ar", "fa",
             "he", "hi", "zh", "ja", "ko", "vi", "id", "el", "ro", "hu", "fi")
# Radiology phrasing NegEx's clinical termset lacks (its own terms stay).
EXTRA_NEGATIONS = {
    "preceding_negations": ["no evidence of", "no definite", "free of", "absent"],
    "following_negations": ["ruled out", "is absent", "are absent", "not seen", "not identified", "has resolved",
                            "have resolved", "resolved"],
    "pseudo_negations": ["cannot exclude", "cannot be excluded", "can not be excluded", "not excluded",
                         "cannot rule out", "cannot be ruled out", "not ruled out", "no change", "no interval change"],
}
_LATIN_LETTER = re.compile(r"[A-Za-z]")
_LETTER = re.compile(r"[^\W\d_]")


@dataclass(frozen=True)
class Mention:
    """One lexicon term found in the text: canonical term, category, negated, character span."""

    term: str
    category: str
    negated: bool
    start: int
    end: int


@dataclass(frozen=True)
class MinedText:
    """What one text states: its mentions, or why there are none (``reason``, one of :data:`REASONS`)."""

    mentions: tuple[Mention, ...]
    reason: str | None = None

    @property
    def positive(self) -> frozenset[str]:
        """Canonical terms stated as present."""
        return frozenset(m.term for m in self.mentions if not m.negated)

    @property
    def negated(self) -> frozenset[str]:
        """Canonical terms stated as absent."""
        return frozenset(m.term for m in self.mentions if m.negated) - self.positive

    def spans(self, terms: Iterable[str]) -> dict[str, list[tuple[int, int]]]:
        """Where each of ``terms`` is stated as present in the text: term -> character spans, in list order."""
        wanted = set(terms)
        found: dict[str, list[tuple[int, int]]] = {}
        for m in self.mentions:
            if m.term in wanted and not m.negated:
                found.setdefault(m.term, []).append((m.start, m.end))
        return found


def ordered(terms: Iterable[str], categories: dict[str, str]) -> list[str]:
    """``terms`` listed diagnosis first, then findings, then anatomy, each group alphabetically."""
    return sorted(terms, key=lambda term: _rank(term, categories))


def _rank(term: str, categories: dict[str, str]) -> tuple[int, str]:
    return CATEGORIES.index(categories.get(term, "anatomy")), term


class FindingMiner:
    """Text -> :class:`MinedText`, with the lexicon at ``lexicon`` (default: the packaged one)."""

    def __init__(self, lexicon: Path = LEXICON):
        raw = yaml.safe_load(Path(lexicon).read_text(encoding="utf-8"))
        if not isinstance(raw, dict) or set(raw) - {*CATEGORIES, REGION}:
            raise ValueError(f"{lexicon}: expected the sections {', '.join(CATEGORIES)} and optionally {REGION}")
        regions = raw.pop(REGION, None) or {}
        self.category: dict[str, str] = {}  # canonical term -> category
        self.canonical: dict[str, str] = {}  # lower-case spelling -> canonical term
        for category, entries in raw.items():
            for term, others in (entries or {}).items():
                term = str(term).lower()
                self.category[term] = category
                for spelling in (term, *(str(o).lower() for o in others or ())):
                    for form in (spelling, _plural(spelling)):
                        self.canonical.setdefault(form, term)
        self.region: dict[str, str] = {}  # anatomy term -> the body region it lies in
        for region, terms in regions.items():
            for term in terms or ():
                term = str(term).lower()
                if self.category.get(term) != "anatomy" or term in self.region:
                    raise ValueError(f"{lexicon}: {REGION}.{region}: {term!r} is not an anatomy term of one region")
                self.region[term] = str(region).lower()

    @cached_property
    def nlp(self):
        import spacy
        from negspacy.negation import Negex  # noqa: F401  (registers the "negex" factory)
        from negspacy.termsets import termset

        nlp = spacy.blank("en")
        nlp.add_pipe("sentencizer")
        ruler = nlp.add_pipe("entity_ruler", config={"phrase_matcher_attr": "LOWER"})
        ruler.add_patterns([{"label": self.category[term].upper(), "pattern": spelling, "id": term}
                            for spelling, term in self.canonical.items()])
        terms = termset("en_clinical")
        terms.add_patterns(EXTRA_NEGATIONS)
        nlp.add_pipe("negex", config={"neg_termset": terms.get_patterns(),
                                      "ent_types": [c.upper() for c in NEGATABLE]})
        return nlp

    def mine(self, text: str) -> MinedText:
        """The lexicon terms ``text`` states, present or absent; none, with the reason, when it states none."""
        if not text or not text.strip():
            return MinedText((), EMPTY)
        doc = self.nlp(text)
        if self._not_english(text, doc):
            return MinedText((), NOT_ENGLISH)
        mentions = tuple(
            Mention(ent.ent_id_, self.category[ent.ent_id_], bool(ent._.negex) and ent.label_.lower() in NEGATABLE,
                    ent.start_char, ent.end_char)
            for ent in doc.ents if ent.ent_id_ in self.category
        )
        if mentions:
            return MinedText(mentions)
        return MinedText((), NO_TERMS)

    @cached_property
    def _language(self):
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
        identifier.set_languages(list(LANGUAGES))
        return identifier

    def _not_english(self, text: str, doc) -> bool:
        letters = _LETTER.findall(text)
        if letters and len(_LATIN_LETTER.findall(text)) < len(letters) / 2:
            return True
        if sum(t.is_alpha for t in doc) < MIN_WORDS_FOR_LANGUAGE:
            return False
        language, probability = self._language.classify(text)
        return language != "en" and probability >= MIN_LANGUAGE_CONFIDENCE

    def mine_all(self, texts: Sequence[str]) -> tuple[list[MinedText], Counter]:
        """Every text mined, and how many yielded nothing for each reason."""
        mined = [self.mine(text) for text in texts]
        return mined, Counter(m.reason for m in mined if m.reason)


def _plural(spelling: str) -> str:
    """The regular plural of a spelling's last word."""
    if spelling.endswith("y") and spelling[-2:-1] not in ("a", "e", "o", "u", ""):
        return spelling[:-1] + "ies"
    return spelling + ("es" if spelling.endswith(("s", "x", "z", "sh", "ch")) else "s")


@dataclass(frozen=True)
class Explanation:
    """Why a search's hits came back: the query's findings, where they came from, and per hit the
    ones it shares with the query (JSON-ready: ``{"term", "category", "spans": [[start, end], ...]}``,
    spans into the hit's report text)."""

    findings: list[str]
    source: str  # "query text" | "hits' consensus"
    note: str | None  # why ``findings`` is empty
    shared: list[list[dict]]


def consensus_count(reports: int) -> int:
    """How many of ``reports`` distinct hit reports must state a finding for it to be their consensus:
    a third, at least 2."""
    return max(2, ceil(reports / 3))


def explain(miner: FindingMiner, hit_texts: Sequence[str], query_text: str | None = None) -> Explanation:
    """The findings of a text query (its own), or of an image query (the consensus of its hits' distinct
    reports: stated as present by :func:`consensus_count` of them), and the ones each hit's report shares."""
    mined = {text: miner.mine(text) for text in dict.fromkeys(hit_texts)}  # a study's images share one report
    hits = [mined[text] for text in hit_texts]
    if query_text is not None:
        query = miner.mine(query_text)
        findings, source = query.positive, "query text"
        note = None if findings else f"the query states no present finding the lexicon knows: {query.reason or 'only absent ones'}"
    else:
        votes = Counter(term for report in mined.values() for term in report.positive)  # each report votes once
        findings = frozenset(t for t, n in votes.items() if n >= consensus_count(len(mined)))
        source = "hits' consensus"
        note = None if findings else "no findings are known for this image: its nearest reports agree on none"
    shared = [
        [{"term": term, "category": miner.category[term], "spans": [list(span) for span in spans]}
         for term, spans in sorted(hit.spans(findings).items(), key=lambda kv: _rank(kv[0], miner.category))]
        for hit in hits
    ]
    return Explanation(ordered(findings, miner.category), source, note, shared)


def findings_labels(miner: FindingMiner, reports: Sequence[str], fit: np.ndarray, categories: Iterable[str],
                    min_reports: int = 2) -> tuple[np.ndarray, tuple[str, ...]]:
    """Mined findings as a label matrix (uint8 [N, T], names "<category>:<term>") for label-free training:
    the terms of ``categories`` stated as present in at least ``min_reports`` of the reports at rows ``fit``
    (the training split)."""
    mined, reasons = miner.mine_all(reports)
    log.info("mined findings of %d reports; none from %s", len(reports), dict(reasons) or "none")
    return findings_matrix(miner, mined, fit, categories, min_reports)


def findings_matrix(miner: FindingMiner, mined: Sequence[MinedText], fit: np.ndarray, categories: Iterable[str],
                    min_reports: int = 2) -> tuple[np.ndarray, tuple[str, ...]]:
    """:func:`findings_labels` of reports mined already (``miner.mine_all``), so one mining serves several
    choices of ``categories`` ("region": the body region of the first anatomy term stated)."""
    kept = set(categories)
    present = [_label_names(miner, report, kept) for report in mined]
    counts = Counter(name for row in fit for name in present[row])
    order = (*CATEGORIES, REGION)
    names = sorted((n for n, c in counts.items() if c >= min_reports),
                   key=lambda name: (order.index(name.split(":", 1)[0]), name))
    column = {name: j for j, name in enumerate(names)}
    matrix = np.zeros((len(present), len(names)), dtype=np.uint8)
    for row, found in enumerate(present):
        matrix[row, [column[n] for n in found if n in column]] = 1
    return matrix, tuple(names)


def _label_names(miner: FindingMiner, report: MinedText, kept: set[str]) -> set[str]:
    """The "<category>:<term>" labels of one mined report's present terms in ``kept``, plus its "region:<region>"
    (:func:`first_region`) when ``kept`` holds "region"."""
    names = {f"{miner.category[t]}:{t}" for t in report.positive if miner.category[t] in kept}
    if REGION in kept and (region := first_region(miner, report)):
        names.add(f"{REGION}:{region}")
    return names


def first_region(miner: FindingMiner, report: MinedText) -> str | None:
    """The body region of the first anatomy term ``report`` states as present, or None: one region per report, as
    DICOM's body part examined is one value per study (a caption names the part imaged before what it shows)."""
    first = min((m for m in report.mentions if not m.negated and m.term in miner.region), key=lambda m: m.start,
                default=None)
    return miner.region[first.term] if first else None
