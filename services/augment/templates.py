"""The three versioned prompt templates of stage 1 and the item fields they are filled from.

A filled prompt is a completion-style text: an instruction, labelled one-line fields
(``Findings: ...``) and an answer cue. It works for base and chat models alike, and it can be read
back (:func:`read_prompt`), which is how the model-free extractive generator sees the same input
as an LLM does.

Our reading of *image description* without a vision model: the prompt gives what the item says
about its image, namely the acquisition (modality, plane / view), the body region, and the report's
findings; the model describes the image from these. Modality / plane / region come from the item's
view, a ``modality`` section where the reader gives one, and imaging words found in the report
(:data:`IMAGING_TERMS`). Labels are never used: they are what retrieval is evaluated on.
*Joint-modality reasoning* receives the report and the image description produced in the same run.

Changing a template's text must bump its ``version``: the version is part of the cache key.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from medhash.services.data.item import Item

# Section names the dataset readers use, by role (the first non-empty one wins). MedPix's caption
# (the image's own text) comes before its case-level findings.
FINDINGS_SECTIONS = ("caption", "findings", "clinical_notes")
IMPRESSION_SECTIONS = ("impression", "conclusion", "diagnosis")
HISTORY_SECTIONS = ("indication", "history")

# Imaging words looked up in the report: what an image of this item would show.
IMAGING_TERMS = {
    "modality": (
        "CT", "MRI", "MR", "X-ray", "radiograph", "ultrasound", "sonography", "PET", "angiography",
        "angiogram", "mammogram", "fluoroscopy", "T1", "T2", "FLAIR", "DWI", "contrast",
    ),
    "plane": ("axial", "coronal", "sagittal", "PA", "AP", "lateral", "frontal", "oblique", "supine"),
    "region": (
        "head", "brain", "skull", "orbit", "sinus", "neck", "spine", "cervical", "thoracic", "lumbar",
        "chest", "thorax", "lung", "heart", "mediastinum", "breast", "abdomen", "liver", "pancreas",
        "spleen", "kidney", "bowel", "colon", "pelvis", "bladder", "prostate", "uterus", "ovary",
        "shoulder", "hip", "knee", "ankle", "wrist", "foot", "femur", "bone",
    ),
}
MAX_FIELD_WORDS = 120  # a longer field is cut: generation cost grows with the prompt


@dataclass(frozen=True)
class Template:
    """One prompt template: ``name``, ``version`` and the fields it shows, in order."""

    name: str
    version: str
    instruction: str
    fields: tuple[str, ...]
    answer_cue: str

    def fill(self, values: dict[str, str]) -> str:
        """The prompt for ``values`` (field name -> text); empty fields are left out."""
        lines = [self.instruction, ""]
        lines += [f"{field}: {clip(values[field])}" for field in self.fields if clip(values.get(field, ""))]
        return "\n".join(lines + ["", f"{self.answer_cue}:"])


TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in (
        Template(
            name="image_description",
            version="1",
            instruction="Describe the medical image in one or two sentences: the imaging modality, plane, "
            "body region and the visible abnormalities.",
            fields=("Imaging", "Findings"),
            answer_cue="Image description",
        ),
        Template(
            name="report_summary",
            version="1",
            instruction="Summarise the radiology report as its key findings in one or two sentences.",
            fields=("History", "Findings", "Impression"),
            answer_cue="Key findings",
        ),
        Template(
            name="joint_reasoning",
            version="1",
            instruction="Given the radiology report and the image description, state the facts that "
            "support the diagnosis in one or two sentences.",
            fields=("Findings", "Impression", "Image description"),
            answer_cue="Diagnosis-relevant facts",
        ),
    )
}


def clip(text: str, max_words: int = MAX_FIELD_WORDS) -> str:
    """``text`` on one line, cut to its first ``max_words`` words (bounds the prompt length)."""
    return " ".join(text.split()[:max_words])


def one_line(text: str) -> str:
    """``text`` with all whitespace runs (newlines included) collapsed to one space."""
    return " ".join(text.split())


def section(item: Item, names: tuple[str, ...]) -> str:
    """The first non-empty section of ``item`` among ``names`` (case-insensitive), or ''."""
    by_name = {key.lower(): value for key, value in item.sections.items()}
    return next((by_name[n] for n in names if by_name.get(n, "").strip()), "")


def acquisition(item: Item) -> str:
    """Modality / plane / region of the item's image: modality section, view, report words."""
    parts = [section(item, ("modality",)), item.view]
    known = " ".join(parts).lower()
    for terms in IMAGING_TERMS.values():
        for term in terms:
            flags = 0 if term.isupper() else re.IGNORECASE  # acronyms match in capitals only
            # not after a hyphen: "Non-contrast CT" is no contrast study
            if term.lower() not in known and re.search(rf"(?<![\w-]){re.escape(term)}\b", item.report, flags):
                parts.append(term)
                known += " " + term.lower()
    return "; ".join(dict.fromkeys(one_line(p) for p in parts if one_line(p)))


def prompt_fields(item: Item, description: str = "") -> dict[str, str]:
    """The template fields of ``item``; ``description`` is the image description, when known.

    Without a findings section, the whole report is the findings.
    """
    return {
        "Imaging": acquisition(item),
        "History": section(item, HISTORY_SECTIONS),
        "Findings": section(item, FINDINGS_SECTIONS) or item.report,
        "Impression": section(item, IMPRESSION_SECTIONS),
        "Image description": description,
    }


def read_prompt(prompt: str) -> tuple[Template, dict[str, str]]:
    """The template that wrote ``prompt`` and its field values (the inverse of :meth:`Template.fill`)."""
    first_line = prompt.split("\n", 1)[0]
    template = next((t for t in TEMPLATES.values() if t.instruction == first_line), None)
    if template is None:
        raise ValueError(f"not a medhash augmentation prompt: {first_line[:80]!r}")
    values = {}
    for line in prompt.split("\n")[2:]:
        field, sep, value = line.partition(": ")
        if sep and field in template.fields:
            values[field] = value
    return template, values
