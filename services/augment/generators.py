"""Text generators behind one interface, ``generate(prompts) -> texts``, and their output cleanup.

- :class:`ExtractiveGenerator` needs no model: section- and negation-aware sentence selection.
- :class:`LocalLMGenerator` runs a Hugging Face causal LM (default: the offline Gemma-3-270M), by default
  copy-constrained (:class:`CopyConstraint`: it may only write whole clauses of the prompt's fields).
- :class:`OpenAIGenerator` calls an OpenAI-compatible server (vLLM, Ollama, TGI) through
  ``POST {endpoint}/v1/chat/completions``: the chat route, because every such server offers it and
  the instruction-tuned models a hospital would deploy expect their chat template.

Each generator has a ``key`` naming it and its decoding settings (:func:`generator_key`); the cache
files are named by it. ``copies_source`` says whether its text is the source's own (extractive) or
written by a model, and so checked against the source (:mod:`.grounding`).
"""
from __future__ import annotations

import logging
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import requests

from medhash.services.augment.templates import Template, read_prompt
from medhash.services.config import AugmentConfig, LLMConfig
from medhash.services.errors import ConfigError, DataError

log = logging.getLogger(__name__)


class Generator(Protocol):
    key: str
    copies_source: bool

    def generate(self, prompts: list[str]) -> list[str]: ...


def make_generator(cfg: AugmentConfig, llm_cfg: LLMConfig) -> Generator:
    """The generator ``cfg.generator`` names; "local" loads ``llm_cfg``'s model at full depth, whatever
    depth training cuts it to: a cut-down model writes worse, and one cache serves every training depth."""
    key = generator_key(cfg, llm_cfg)
    if cfg.generator == "extractive":
        return ExtractiveGenerator()
    if cfg.generator == "local":
        from medhash.services.backbones.llm import load_causal_lm

        model, tokenizer = load_causal_lm(llm_cfg.model_copy(update={"num_layers": None}))
        return LocalLMGenerator(model, tokenizer, key, cfg.max_new_tokens, cfg.temperature, cfg.batch_size,
                                copy=cfg.decoding == "copy")
    return OpenAIGenerator(
        cfg.endpoint, cfg.model, cfg.api_key_env, key, cfg.max_new_tokens, cfg.temperature,
        timeout_s=cfg.timeout_s, retries=cfg.retries, workers=cfg.batch_size,
    )


def generator_key(cfg: AugmentConfig, llm_cfg: LLMConfig) -> str:
    """The name of the generator ``cfg`` describes and its decoding settings, safe as a file name."""
    if cfg.generator == "extractive":
        return ExtractiveGenerator.key
    if cfg.generator == "local":
        model = f"{llm_cfg.name}-{cfg.decoding}"  # always the full model (make_generator)
    else:
        model = cfg.model
    return slug(f"{cfg.generator}-{model}-n{cfg.max_new_tokens}-t{cfg.temperature:g}")


def slug(text: str) -> str:
    """``text`` made safe as a file name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


# --- sentences, negation and cleanup --------------------------------------------------------------

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9(\[])|\s*\n\s*|\s*[•·]\s*")
_ENUMERATOR = re.compile(r"^(?:\(?\d{1,2}[.)]|[a-z]\))\s+")  # "2) ", "(3) ", "1. ", "a) "
# NegEx-style: pseudo-negations are removed first, so "cannot be excluded" stays a positive mention.
_PSEUDO_NEGATIONS = re.compile(
    r"\b(?:no (?:significant |interval )?change|not (?:be )?excluded|cannot be (?:excluded|ruled out)|"
    r"not ruled out|cannot rule out|not only|no increase|gram[- ]negative)\b",
    re.IGNORECASE,
)
_NEGATION_TRIGGERS = re.compile(
    r"\b(?:no evidence of|no signs? of|negative for|free of|absence of|absent|without|ruled out|"
    r"resolved|no|not|neither|nor|none)\b",
    re.IGNORECASE,
)
# Clause boundaries that end a negation's scope.
_TERMINATIONS = re.compile(r";|,?\s\b(?:but|however|although|though|except|apart from|whereas)\b", re.IGNORECASE)
_NORMAL = re.compile(
    r"\b(?:normal|unremarkable|within normal limits|(?:is|are|remains?) clear|intact)\b", re.IGNORECASE
)
_ENTITY_LEAD = re.compile(r"^(?:(?:evidence|signs?) of |any |a |an |the |of |is |are |there )+", re.IGNORECASE)


def sentences(text: str) -> list[str]:
    """``text`` split into sentences (at sentence ends, line breaks and bullets), without list numbers."""
    parts = (_ENUMERATOR.sub("", s.strip(" -")) for s in _SENTENCE_END.split(text) if s)
    return [s for s in parts if re.search(r"[A-Za-z]", s)]


def clauses(sentence: str) -> list[str]:
    """``sentence`` cut at the words that end a negation's scope ("but", "however", ";")."""
    return [c.strip(" ,") for c in _TERMINATIONS.split(sentence) if c.strip(" ,.")]


def is_negated(clause: str) -> bool:
    return bool(_NEGATION_TRIGGERS.search(_PSEUDO_NEGATIONS.sub(" ", clause)))


def positive_findings(text: str) -> list[str]:
    """The sentences of ``text`` that state an abnormality: negated and normal clauses removed."""
    kept = []
    for sentence in sentences(text):
        positive = [c for c in clauses(sentence) if not is_negated(c) and not _NORMAL.search(c)]
        if positive:
            kept.append(end_sentence(sentence if len(positive) == len(clauses(sentence)) else "; ".join(positive)))
    return dedupe(kept)


def negated_findings(text: str, max_words: int = 8) -> list[str]:
    """What ``text`` says is absent ("no pneumothorax" -> "pneumothorax")."""
    absent = []
    for sentence in sentences(text):
        for clause in clauses(sentence):
            match = _NEGATION_TRIGGERS.search(_PSEUDO_NEGATIONS.sub(lambda m: "_" * len(m.group()), clause))
            if match:
                entity = _ENTITY_LEAD.sub("", clause[match.end():].strip(" ,.")).strip(" ,.")
                if entity:
                    absent.append(" ".join(entity.split()[:max_words]))
    return dedupe(absent)


def normalised(text: str) -> str:
    """``text`` for comparison: lower case, punctuation and spacing ignored."""
    return re.sub(r"\W+", " ", text.lower()).strip()


def dedupe(texts: list[str]) -> list[str]:
    """``texts`` without repeats (compared :func:`normalised`), order kept."""
    first: dict[str, str] = {}
    for text in texts:
        if normalised(text):
            first.setdefault(normalised(text), text)
    return list(first.values())


def end_sentence(text: str) -> str:
    text = text.strip()
    return text if not text or text[-1] in ".!?" else text + "."


def clean_generation(text: str) -> str:
    """An LLM continuation cut to its answer.

    Stops at the first blank line, at a leaked special token (``<start_of_image>``), at a line that
    opens a new labelled field ("Findings: ..."), and before the first repeated sentence; drops a
    trailing unfinished sentence when a finished one precedes it.
    """
    text = re.split(r"\n\s*\n|<[a-z_]{2,30}>", text.strip(), maxsplit=1)[0]  # blank line or a special token
    lines = []
    for line in text.split("\n"):
        if lines and re.match(r"^\s*[A-Z][\w /-]{0,40}:", line):
            break
        lines.append(line)
    kept = dedupe_until_repeat(sentences(" ".join(lines)))
    if len(kept) > 1 and kept[-1][-1] not in ".!?":
        kept = kept[:-1]
    return " ".join(kept).strip()


def dedupe_until_repeat(items: list[str]) -> list[str]:
    """``items`` up to (not including) the first one that repeats an earlier one."""
    seen: set[str] = set()
    for i, item in enumerate(items):
        if normalised(item) in seen:
            return items[:i]
        seen.add(normalised(item))
    return items


# --- the generators -------------------------------------------------------------------------------


class ExtractiveGenerator:
    """Model-free augmentation: picks and arranges the report's own sentences. Deterministic.

    - image description: acquisition (modality, plane, region) + up to two positive findings;
    - report summary: the impression, then positive findings, up to three sentences;
    - joint reasoning: diagnosis, supporting positive findings, pertinent negatives, image line.
    Negated and normal statements are never presented as findings (NegEx-style trigger list).
    """

    key = "extractive-v1"  # bump when the selection rules change
    copies_source = True

    def generate(self, prompts: list[str]) -> list[str]:
        return [self._answer(*read_prompt(p)) for p in prompts]

    def _answer(self, template: Template, values: dict[str, str]) -> str:
        findings = positive_findings(values.get("Findings", ""))
        impression = sentences(values.get("Impression", ""))
        if template.name == "image_description":
            imaging = values.get("Imaging", "").replace("; ", ", ")
            lead = f"{imaging} image." if imaging else "Medical image."
            return " ".join([lead] + (findings[:2] or ["No abnormality is described."]))
        if template.name == "report_summary":
            summary = dedupe([end_sentence(s) for s in impression[:2]] + findings)[:3]
            return " ".join(summary) or "No abnormality reported."
        diagnosis = impression[0] if impression else (findings[0] if findings else "not stated")
        parts = [f"Diagnosis: {end_sentence(diagnosis)}"]
        support = [f for f in findings if f != diagnosis][:3]
        if support:
            parts.append("Supporting findings: " + " ".join(support))
        absent = negated_findings(values.get("Findings", ""))
        if absent:
            parts.append("Absent: " + "; ".join(absent[:4]) + ".")
        description = sentences(values.get("Image description", ""))
        if description:
            parts.append("Image: " + end_sentence(description[0]))
        return " ".join(parts)


_FIELD = re.compile(r"^[A-Z][\w /-]{0,40}: (.+)$", re.MULTILINE)  # a prompt's "Findings: ..." line
_CLAUSE_END = (".", ",", ";")


def prompt_source(prompt: str) -> str:
    """The texts of a prompt's labelled fields, each ended as a sentence: what a copy-constrained
    answer may copy from."""
    return " ".join(end_sentence(" ".join(value.split())) for value in _FIELD.findall(prompt))


def whole_clauses(text: str) -> str:
    """``text`` up to its last clause end (a copy cut short by the token budget loses its unfinished clause)."""
    cut = max(text.rfind(mark) for mark in _CLAUSE_END)
    return text[: cut + 1] if cut >= 0 else ""


class CopyConstraint:
    """Copy-constrained decoding (``prefix_allowed_tokens_fn`` of ``generate``): the model may only write
    whole clauses of its source, each at most once, in the order it chooses, and stop after any of them.

    A clause is a run of the source's tokens up to and including a clause end (".", ",", ";"), so a
    negation stays with what it negates ("No dominant prostate mass is evident."). Every word written is
    the source's; the model decides which clauses each template keeps and in what order. A clause is only
    begun when it fits in what is left of ``max_new_tokens`` (a clause cut by the budget would be dropped,
    and a long first clause left the whole view empty).
    """

    def __init__(self, tokenizer, sources: list[str], prompt_length: int, max_new_tokens: int):
        self.prompt_length, self.end, self.budget = prompt_length, tokenizer.eos_token_id, max_new_tokens
        ends = {tokenizer.convert_tokens_to_ids(mark) for mark in _CLAUSE_END}
        self.clauses: list[list[list[int]]] = []
        for source in sources:
            clauses, current = [], []
            for token in tokenizer(" " + source, add_special_tokens=False)["input_ids"]:
                current.append(token)
                if token in ends:
                    clauses.append(current)
                    current = []
            self.clauses.append(clauses + ([current] if current else []))

    def __call__(self, row: int, input_ids) -> list[int]:
        clauses = self.clauses[row]
        used: set[int] = set()
        open_clauses = None  # (clause, tokens copied) of the clause being written; None: between clauses
        written = input_ids[self.prompt_length:].tolist()
        for position, token in enumerate(written):
            if open_clauses is None:
                open_clauses = [(c, 0) for c in self._fitting(clauses, used, position)]
            open_clauses = [(c, k + 1) for c, k in open_clauses if k < len(clauses[c]) and clauses[c][k] == token]
            done = [c for c, k in open_clauses if k == len(clauses[c])]
            if done:
                used.add(done[0])
                open_clauses = None
        if open_clauses is None:
            starts = sorted({clauses[c][0] for c in self._fitting(clauses, used, len(written))})
            return starts + [self.end] if used else starts or [self.end]
        return sorted({clauses[c][k] for c, k in open_clauses}) or [self.end]

    def _fitting(self, clauses: list[list[int]], used: set[int], position: int) -> list[int]:
        """The unused clauses that, begun at ``position``, end within the token budget."""
        return [c for c in range(len(clauses)) if c not in used and position + len(clauses[c]) <= self.budget]


class LocalLMGenerator:
    """A Hugging Face causal LM generating for batches of left-padded prompts.

    Small base models loop quickly, so decoding penalises repeats and the output is cleaned
    (:func:`clean_generation`). ``temperature`` 0 is greedy decoding. With ``copy`` the model may only
    write whole clauses of the prompt's fields (:class:`CopyConstraint`), with no repeat penalties.
    """

    copies_source = False

    def __init__(self, model, tokenizer, key: str, max_new_tokens: int, temperature: float, batch_size: int,
                 copy: bool = False):
        self.model, self.tokenizer = model, tokenizer
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.max_new_tokens, self.temperature, self.batch_size = max_new_tokens, temperature, batch_size
        self.key, self.copy = key, copy

    def generate(self, prompts: list[str]) -> list[str]:
        import torch

        with torch.inference_mode():
            return self._generate(prompts)

    def _generate(self, prompts: list[str]) -> list[str]:
        texts = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = prompts[start:start + self.batch_size]
            batch = self.tokenizer(chunk, return_tensors="pt", padding=True)
            decoding = {"do_sample": True, "temperature": self.temperature} if self.temperature > 0 else {"do_sample": False}
            if self.copy:  # copies repeat the prompt's n-grams by design; each clause is used once instead
                decoding["prefix_allowed_tokens_fn"] = CopyConstraint(
                    self.tokenizer, [prompt_source(p) for p in chunk], batch["input_ids"].shape[1],
                    self.max_new_tokens)
            else:
                decoding |= {"repetition_penalty": 1.3, "no_repeat_ngram_size": 3}
            out = self.model.generate(
                **batch, max_new_tokens=self.max_new_tokens, pad_token_id=self.tokenizer.pad_token_id, **decoding,
            )
            new_tokens = out[:, batch["input_ids"].shape[1]:]
            written = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            texts += [whole_clauses(t.strip()) if self.copy else clean_generation(t) for t in written]
        return texts


class OpenAIGenerator:
    """An OpenAI-compatible chat-completions endpoint; ``workers`` requests in flight at once.

    The API key is read from the environment variable ``api_key_env`` (no header when unset, as for a
    local vLLM). Connection failures, timeouts, HTTP 429 and 5xx are retried with exponential backoff.
    """

    copies_source = False

    def __init__(self, endpoint: str, model: str, api_key_env: str, key: str, max_new_tokens: int, temperature: float,
                 timeout_s: float = 60.0, retries: int = 3, workers: int = 4, backoff_s: float = 1.0):
        if not model:
            raise ConfigError("augment.model: the 'openai' generator needs the model name the server serves")
        self.url = endpoint.rstrip("/") + "/v1/chat/completions"
        self.model, self.api_key_env = model, api_key_env
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.timeout_s, self.retries, self.workers, self.backoff_s = timeout_s, retries, workers, backoff_s
        self.key = key

    def generate(self, prompts: list[str]) -> list[str]:
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            return list(pool.map(self.complete, prompts))

    def complete(self, prompt: str) -> str:
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": self.max_new_tokens,
            "temperature": self.temperature,
        }
        api_key = os.environ.get(self.api_key_env)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        problem = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                response = requests.post(self.url, json=body, headers=headers, timeout=self.timeout_s)
            except requests.RequestException as exc:
                problem = f"cannot connect ({type(exc).__name__})"
                continue
            if response.status_code == 429 or response.status_code >= 500:
                problem = f"HTTP {response.status_code}"
                continue
            if response.status_code in (401, 403):
                raise ConfigError(f"{self.url}: HTTP {response.status_code}: check the API key in ${self.api_key_env}")
            if response.status_code != 200:
                raise ConfigError(f"{self.url}: HTTP {response.status_code}: {response.text[:200]}")
            try:
                return clean_generation(response.json()["choices"][0]["message"]["content"] or "")
            except (ValueError, KeyError, IndexError, TypeError) as exc:
                raise DataError(f"{self.url}: not a chat-completions response: {response.text[:200]}") from exc
        raise DataError(f"LLM endpoint {self.url} failed after {self.retries + 1} attempts: {problem} "
                        "(check augment.endpoint and that the server is running)")
