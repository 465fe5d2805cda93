"""Mined findings (spaCy + negspacy over the radiology lexicon) and why a search hit came back."""
from __future__ import annotations

import pytest

from medhash.services.config import DataConfig
from medhash.services.data import open_dataset
import numpy as np

from medhash.services.findings import (
    EMPTY, NO_TERMS, NOT_ENGLISH, FindingMiner, consensus_count, explain, findings_labels,
)

# Real MedPix captions, mined by hand: (present, absent). Anatomy is never negated.
MEDPIX_EXPECTED = {
    "MPX1009_synpic46283": ({"prostate", "enlargement", "calcification"}, {"mass"}),
    "MPX1034_synpic39539": ({"mass", "soft tissue", "temporal bone"}, {"erosion"}),
    "MPX1060_synpic19246": ({"hypodensity", "parietal lobe"}, {"compression", "hemorrhage"}),
    "MPX1106_synpic45737": ({"mass", "enhancement", "upper lobe"}, {"calcification"}),
    "MPX1193_synpic51666": ({"hypodensity", "mass", "neck"}, {"nodule", "calcification"}),
    "MPX1253_synpic21241": ({"mass", "nodule", "colon"}, {"lymphadenopathy"}),
    "MPX1563_synpic51033": ({"mass", "frontal lobe"}, {"mass effect", "edema"}),
    "MPX1609_synpic19714": ({"cyst", "temporal lobe"}, {"edema"}),
    "MPX2155_synpic22532": ({"pancreas", "liver"}, {"metastasis"}),
    "MPX2515_synpic28377": ({"free fluid", "pelvis"}, {"pneumoperitoneum"}),
}


@pytest.fixture(scope="module")
def miner() -> FindingMiner:
    return FindingMiner()


@pytest.mark.real
def test_real_medpix_captions_give_the_hand_checked_findings(miner, shared_data):
    reports = {item.id: item.report for item in open_dataset(DataConfig(dataset="medpix2", root=shared_data / "medpix2")).items}
    for item_id, (present, absent) in MEDPIX_EXPECTED.items():
        mined = miner.mine(reports[item_id])
        assert (set(mined.positive), set(mined.negated)) == (present, absent), (item_id, reports[item_id])


def test_negation_scope_spellings_and_possibilities(miner):
    mined = miner.mine("No pleural effusions or pneumothorax. Large right lung masses, but no fracture. Pneumonia cannot be excluded.")
    assert mined.positive == {"lung", "mass", "pneumonia"}
    assert mined.negated == {"pleural effusion", "pneumothorax", "fracture"}
    assert miner.mine("There is no evidence of free air.").negated == {"pneumoperitoneum"}
    assert miner.mine("Haemorrhage in the left frontal lobe.").positive == {"hemorrhage", "frontal lobe"}


@pytest.mark.parametrize("text, reason", [
    ("", EMPTY),
    ("   \n\t", EMPTY),
    ("Neumonía en el lóbulo inferior derecho con derrame pleural", NOT_ENGLISH),
    ("Pneumonie du lobe inférieur droit avec épanchement pleural", NOT_ENGLISH),
    ("肺炎，右下叶", NOT_ENGLISH),
    ("See attached report.", NO_TERMS),
    ("Image courtesy of the department. Case submitted for teaching purposes.", NO_TERMS),
])
def test_empty_foreign_or_boilerplate_text_gets_a_reason_and_no_findings(miner, text, reason):
    mined = miner.mine(text)
    assert mined.mentions == () and mined.reason == reason


def test_reasons_are_counted_and_terse_english_captions_are_mined(miner):
    mined, reasons = miner.mine_all(["Joint effusion", "Situs inversus.", "", "Subsequent CT images", "肺炎"])
    assert mined[0].positive == {"effusion"} and mined[0].reason is None
    assert reasons == {EMPTY: 1, NOT_ENGLISH: 1, NO_TERMS: 2}


def test_a_text_query_shares_its_present_findings_with_the_hits_that_state_them(miner):
    hits = ["Large right pleural effusion and a lung mass.", "No pleural effusion. Lung nodule.", "Fracture of the femur."]
    why = explain(miner, hits, "pleural effusion and a mass")
    assert (why.findings, why.source, why.note) == (["mass", "pleural effusion"], "query text", None)
    first = {f["term"]: f["spans"] for f in why.shared[0]}
    assert {term: [hits[0][s:e] for s, e in spans] for term, spans in first.items()} == {
        "mass": ["mass"], "pleural effusion": ["pleural effusion"]}
    assert why.shared[1] == [] and why.shared[2] == []  # an absent effusion is not shared


def test_an_image_query_is_explained_by_the_consensus_of_its_hits(miner):
    hits = ["Right pleural effusion.", "Small pleural effusion with atelectasis.", "Pleural effusions.",
            "Rib fracture.", "Lung nodule.", "Atelectasis."]
    assert consensus_count(len(hits)) == 2
    why = explain(miner, hits)
    assert why.source == "hits' consensus" and why.findings == ["atelectasis", "pleural effusion"]
    assert [[f["term"] for f in shared] for shared in why.shared] == [
        ["pleural effusion"], ["atelectasis", "pleural effusion"], ["pleural effusion"], [], [], ["atelectasis"]]
    same_study = explain(miner, ["Rib fracture."] * 8 + ["Lung nodule.", "Atelectasis."])  # one report, eight images
    assert same_study.findings == [] and same_study.shared == [[]] * 10
    nothing = explain(miner, ["Rib fracture.", "Lung nodule.", "Atelectasis."])
    assert nothing.findings == [] and "agree on none" in nothing.note and nothing.shared == [[], [], []]


def test_a_query_with_no_known_finding_says_so(miner):
    why = explain(miner, ["Rib fracture."], "see the attached report")
    assert why.findings == [] and why.shared == [[]] and "no present finding" in why.note


def test_a_lexicon_with_an_unknown_section_is_refused(tmp_path):
    lexicon = tmp_path / "lexicon.yaml"
    lexicon.write_text("symptoms:\n  cough: []\n")
    with pytest.raises(ValueError, match="diagnosis, finding, anatomy"):
        FindingMiner(lexicon)


def test_mined_findings_become_labels_from_the_training_rows_only(miner):
    reports = ["Right pleural effusion.", "Left pleural effusion and a lung mass.", "Lung mass.", "No effusion.",
               "Pneumothorax.", "Pneumothorax and pleural effusion."]
    everything = ("anatomy", "finding", "diagnosis")
    matrix, names = findings_labels(miner, reports, fit=np.arange(4), categories=everything)  # rows 4-5: dev, query
    assert names == ("finding:mass", "finding:pleural effusion", "anatomy:lung")  # stated by >= 2 training reports
    assert matrix.tolist() == [[0, 1, 0], [1, 1, 1], [1, 0, 1], [0, 0, 0], [0, 0, 0], [0, 1, 0]]
    matrix, names = findings_labels(miner, reports, fit=np.arange(4), categories=("anatomy",))
    assert names == ("anatomy:lung",) and matrix[:, 0].tolist() == [0, 1, 1, 0, 0, 0]


def test_anatomy_terms_give_their_body_regions(miner):
    reports = ["Hepatic cyst and a renal stone.", "Renal stone and a hepatic cyst.", "No renal stone. Hepatic cyst.",
               "Splenic laceration.", "Lung mass.", "Cerebellar infarct.", "Aortic dissection.",
               "Bladder wall thickening."]  # a vessel lies in no one region
    matrix, names = findings_labels(miner, reports, fit=np.arange(8), categories=("region",), min_reports=1)
    assert names == ("region:abdomen", "region:chest", "region:genitourinary", "region:head")
    # one region per report: its first anatomy term (an absent stone still names the kidney imaged); the kidney
    # and the bladder are one genitourinary region across abdomen and pelvis
    assert matrix.tolist() == [[1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 1, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1],
                               [0, 0, 0, 0], [0, 0, 1, 0]]
    _, both = findings_labels(miner, reports, fit=np.arange(8), categories=("anatomy", "region"), min_reports=1)
    assert "anatomy:lung" in both and "region:chest" in both  # a term and its region are two labels


def test_a_region_of_a_term_that_is_not_anatomy_is_refused(tmp_path):
    lexicon = tmp_path / "lexicon.yaml"
    lexicon.write_text("diagnosis:\n  pneumonia: []\nanatomy:\n  lung: []\nregion:\n  chest: [lung, pneumonia]\n")
    with pytest.raises(ValueError, match="region.chest: 'pneumonia' is not an anatomy term"):
        FindingMiner(lexicon)
