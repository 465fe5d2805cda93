"""Stage 1 augmentation: templates, extractive generator, cache resume, OpenAI-compatible and local LMs."""
from __future__ import annotations

import dataclasses
import json
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from medhash.services.augment import augment_dataset, run_augmentation
from medhash.services.augment.cache import cache_path
from medhash.services.augment.generators import (
    ExtractiveGenerator,
    LocalLMGenerator,
    OpenAIGenerator,
    clean_generation,
    make_generator,
    negated_findings,
    prompt_source,
    positive_findings,
)
from medhash.services.augment.grounding import EMPTY, NOTHING_KEPT, Source, Verdict, source_text, verify
from medhash.services.augment.templates import TEMPLATES, acquisition, prompt_fields, read_prompt
from medhash.services.config import AugmentConfig, LLMConfig
from medhash.services.data.item import Dataset, Item
from medhash.services.errors import ConfigError, DataError
from medhash.services.findings import FindingMiner

IU_NORMAL = Item(
    id="iu-1", image_paths=(), report="", patient_id="1", labels=("mesh:normal",), split="train", view="PA",
    sections={
        "indication": "Positive TB test",
        "findings": "The cardiac silhouette and mediastinum size are within normal limits. There is no pulmonary "
        "edema. There is no focal consolidation. There is no evidence of pneumothorax.",
        "impression": "Normal chest x-ray.",
    },
)
IU_ABNORMAL = Item(
    id="iu-2", image_paths=(), report="", patient_id="2", labels=("mesh:Opacity",), split="train", view="PA",
    sections={
        "findings": "Stable calcified granuloma within the right upper lung. No pneumothorax, but there is a small "
        "left pleural effusion. Malignancy cannot be excluded. The lungs are clear otherwise.",
        "impression": "Small left pleural effusion.",
    },
)
MEDPIX_STYLE = Item(
    id="MPX1_synpic1", image_paths=(), report="Axial CT of the chest reveals an obstructing mass and resultant "
    "LUL collapse. No pleural effusion.", patient_id="MPX1", labels=(), split="dev", view="Axial",
    sections={
        "caption": "Axial CT of the chest reveals an obstructing mass and resultant LUL collapse. No pleural effusion.",
        "history": "60-year-old woman with chest pain.",
        "diagnosis": "Small cell lung carcinoma",
    },
)


@pytest.fixture(autouse=True)
def own_cache(request, tmp_path, monkeypatch):
    """A fresh cache per unit test; real tests keep the session cache (converted weights live there)."""
    if request.node.get_closest_marker("real") is None:
        monkeypatch.setenv("MEDHASH_CACHE", str(tmp_path))


def with_report(item: Item) -> Item:
    """The item with its report = findings + impression, as the IU X-ray reader builds it."""
    text = "\n".join(item.sections[s] for s in ("caption", "findings", "impression") if s in item.sections)
    return dataclasses.replace(item, report=text)


def small_dataset(n: int = 6) -> Dataset:
    """``n`` items cycling through the three report styles, each with its own extra finding."""
    items = []
    for i in range(n):
        base = (IU_NORMAL, IU_ABNORMAL, MEDPIX_STYLE)[i % 3]
        name = "caption" if "caption" in base.sections else "findings"
        sections = base.sections | {name: f"{base.sections[name]} Nodule {i} in the liver."}
        items.append(with_report(dataclasses.replace(base, id=f"item-{i}", sections=sections)))
    return Dataset("unit", items, [])


class Interrupting:
    """The real extractive generator, interrupted (Ctrl-C) on its ``stop_at``-th call; records prompts."""

    def __init__(self, stop_at: int | None = None):
        self.inner, self.stop_at, self.calls, self.prompts = ExtractiveGenerator(), stop_at, 0, []
        self.key, self.copies_source = self.inner.key, True

    def generate(self, prompts: list[str]) -> list[str]:
        self.calls += 1
        if self.calls == self.stop_at:
            raise KeyboardInterrupt
        self.prompts += prompts
        return self.inner.generate(prompts)


# --- templates -----------------------------------------------------------------------------------


def test_templates_fill_every_field_and_read_back():
    fields = prompt_fields(with_report(IU_ABNORMAL), description="PA chest radiograph.")
    assert fields["Imaging"] == "PA; lung"  # the view, then imaging words of the report
    assert fields["Impression"] == "Small left pleural effusion."
    for template in TEMPLATES.values():
        prompt = template.fill(fields)
        assert prompt.startswith(template.instruction + "\n\n") and prompt.endswith(f"\n\n{template.answer_cue}:")
        again, values = read_prompt(prompt)
        assert again is template
        assert values == {f: " ".join(fields[f].split()) for f in template.fields if fields[f]}
    non_contrast = dataclasses.replace(MEDPIX_STYLE, report="Non-contrast CT of the head. X-ray of the chest.")
    assert acquisition(non_contrast) == "Axial; CT; X-ray; head; chest"  # no "contrast" for a non-contrast study
    history_free = TEMPLATES["report_summary"].fill(prompt_fields(MEDPIX_STYLE) | {"History": " \n"})
    assert "History:" not in history_free  # empty fields are left out
    with pytest.raises(ValueError, match="not a medhash augmentation prompt"):
        read_prompt("Tell me a story.")


def test_imaging_line_uses_view_and_report_words_not_labels():
    fields = prompt_fields(dataclasses.replace(MEDPIX_STYLE, labels=("location:Thorax", "topic:Neoplasm")))
    assert fields["Imaging"] == "Axial; CT; chest"
    assert "Thorax" not in TEMPLATES["image_description"].fill(fields)
    assert fields["Findings"] == MEDPIX_STYLE.sections["caption"]  # the image's own caption, not case text


def test_long_fields_are_clipped():
    long = dataclasses.replace(MEDPIX_STYLE, sections={"caption": "word " * 500})
    prompt = TEMPLATES["image_description"].fill(prompt_fields(long))
    assert len(prompt.split()) < 160


# --- extractive generator ------------------------------------------------------------------------


def test_negation_aware_sentence_selection():
    findings = IU_ABNORMAL.sections["findings"]
    assert positive_findings(findings) == [
        "Stable calcified granuloma within the right upper lung.",
        "there is a small left pleural effusion.",
        "Malignancy cannot be excluded.",  # a pseudo-negation stays a positive mention
    ]
    assert negated_findings(findings) == ["pneumothorax"]
    assert positive_findings(IU_NORMAL.sections["findings"]) == []
    assert negated_findings(IU_NORMAL.sections["findings"]) == ["pulmonary edema", "focal consolidation", "pneumothorax"]


def extractive(item: Item, description: str = "") -> dict[str, str]:
    fields = prompt_fields(item, description)
    return {name: ExtractiveGenerator().generate([t.fill(fields)])[0] for name, t in TEMPLATES.items()}


def test_extractive_outputs_on_report_styles():
    normal = extractive(with_report(IU_NORMAL))
    assert normal["image_description"] == "PA, X-ray, chest, mediastinum image. No abnormality is described."
    assert normal["report_summary"] == "Normal chest x-ray."
    assert "Absent: pulmonary edema; focal consolidation; pneumothorax." in normal["joint_reasoning"]

    abnormal = extractive(with_report(IU_ABNORMAL), description="PA chest radiograph.")
    assert "pneumothorax" not in abnormal["image_description"]
    assert abnormal["report_summary"].startswith("Small left pleural effusion. Stable calcified granuloma")
    assert abnormal["joint_reasoning"].startswith("Diagnosis: Small left pleural effusion. Supporting findings: Stable")
    assert abnormal["joint_reasoning"].endswith("Absent: pneumothorax. Image: PA chest radiograph.")

    medpix = extractive(MEDPIX_STYLE)
    assert medpix["image_description"] == (
        "Axial, CT, chest image. Axial CT of the chest reveals an obstructing mass and resultant LUL collapse."
    )
    assert medpix["joint_reasoning"].startswith("Diagnosis: Small cell lung carcinoma.")
    assert extractive(MEDPIX_STYLE) == medpix  # deterministic


# --- pipeline and cache --------------------------------------------------------------------------


def test_cache_resumes_after_interrupt_and_tolerates_a_truncated_line():
    dataset, cfg = small_dataset(6), AugmentConfig(generator="extractive", batch_size=2)
    interrupted = Interrupting(stop_at=3)  # two batches of image descriptions done, then Ctrl-C
    with pytest.raises(KeyboardInterrupt):
        run_augmentation(dataset, cfg, LLMConfig(), progress=False, generator=interrupted)
    path = cache_path("unit", ExtractiveGenerator.key)
    assert len(path.read_text().splitlines()) == 4
    with path.open("a") as f:
        f.write('{"id": "item-4", "template": "image_descr')  # the append the interrupt cut short

    resumed = Interrupting()
    run = run_augmentation(dataset, cfg, LLMConfig(), progress=False, generator=resumed)
    assert (run.cached, run.generated) == (4, 14) and len(resumed.prompts) == 14
    assert not set(interrupted.prompts) & set(resumed.prompts)  # nothing recomputed
    assert all(json.loads(line) for line in path.read_text().splitlines())  # the cut line is gone

    again = run_augmentation(dataset, cfg, LLMConfig(), progress=False, generator=Interrupting())
    assert (again.cached, again.generated) == (18, 0) and again.texts == run.texts


def test_template_version_and_input_are_part_of_the_key(monkeypatch):
    dataset, cfg = small_dataset(3), AugmentConfig(generator="extractive")
    first = augment_dataset(dataset, cfg, LLMConfig(), progress=False)
    bumped = dataclasses.replace(TEMPLATES["report_summary"], version="2")
    monkeypatch.setitem(TEMPLATES, "report_summary", bumped)
    run = run_augmentation(dataset, cfg, LLMConfig(), progress=False)
    assert (run.generated, run.cached) == (3, 6) and run.texts == first

    edited = Dataset("unit", [dataclasses.replace(dataset.items[0], report="New text. Large mass.", sections={})]
                     + dataset.items[1:], [])
    run = run_augmentation(edited, cfg, LLMConfig(), progress=False)
    assert run.generated == 3  # the edited item's three prompts changed, nothing else
    assert "Large mass." in run.texts["item-0"]["report_summary"]


def test_training_reads_the_generators_views_and_the_extractive_ones_when_asked():
    from medhash.services.config import load_config

    assert [s.generator for s in AugmentConfig().generators()] == ["local"]  # an LLM writes the views by default
    both = AugmentConfig(generator="openai", model="m", also_extractive=True).generators()
    assert [(s.generator, s.model) for s in both] == [("openai", "m"), ("extractive", "m")]
    with pytest.raises(ConfigError, match="also_extractive: the generator is the extractive one already"):
        load_config(None, {"augment.generator": "extractive", "augment.also_extractive": True})


def test_bad_items_are_reported_and_skipped():
    dataset = small_dataset(2)
    dataset.items.append(dataclasses.replace(MEDPIX_STYLE, id="empty", report="", sections={}))
    cfg = AugmentConfig(generator="extractive", templates=("report_summary",))
    run = run_augmentation(dataset, cfg, LLMConfig(), progress=False)
    assert set(run.texts) == {"item-0", "item-1"}
    assert run.problems == ["1 items without report text, skipped (first: empty)"]


def test_corrupt_cache_line_is_a_clear_error():
    dataset, cfg = small_dataset(2), AugmentConfig(generator="extractive")
    augment_dataset(dataset, cfg, LLMConfig(), progress=False)
    path = cache_path("unit", ExtractiveGenerator.key)
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], "garbage", *lines[1:]]) + "\n")
    with pytest.raises(DataError, match=r"extractive-v1.jsonl:2: not an augmentation record"):
        augment_dataset(dataset, cfg, LLMConfig(), progress=False)


# --- LLM output cleanup and the local LM ---------------------------------------------------------


@pytest.mark.parametrize("raw, clean", [
    (" The lung is clear. The heart is big. The lung is clear. The heart", "The lung is clear. The heart is big."),
    ("Mass in the liver.\n\nFindings: more text", "Mass in the liver."),
    ("Mass in the liver.\nImpression: cancer", "Mass in the liver."),
    ("Small effusion.<start_of_image>The lungs", "Small effusion."),
    ("An unfinished answer without an end", "An unfinished answer without an end"),
])
def test_clean_generation(raw, clean):
    assert clean_generation(raw) == clean


def test_local_generator_batches_left_padded_prompts():
    from medhash.services.backbones.llm import tiny_causal_lm

    model, tokenizer = tiny_causal_lm()
    generator = LocalLMGenerator(model, tokenizer, "tiny", max_new_tokens=12, temperature=0.0, batch_size=3)
    prompts = ["Findings: a mass.\n\nKey findings:", "Findings: a much longer report with many more words.\n\nKey findings:"]
    alone = [generator.generate([p])[0] for p in prompts]
    assert generator.generate(prompts) == alone  # padding does not change what a prompt gets


def clauses_of(text: str) -> list[str]:
    return [c.strip() for c in re.split(r"[.,;]", text) if c.strip()]


def test_copy_constrained_decoding_writes_only_whole_clauses_of_the_prompt_fields():
    from medhash.services.backbones.llm import tiny_causal_lm

    model, tokenizer = tiny_causal_lm()
    generator = LocalLMGenerator(model, tokenizer, "tiny", max_new_tokens=240, temperature=0.0, batch_size=2, copy=True)
    prompts = [TEMPLATES[name].fill(prompt_fields(item))
               for name, item in (("report_summary", MEDPIX_STYLE), ("image_description", with_report(IU_ABNORMAL)))]
    texts = generator.generate(prompts)
    for prompt, text in zip(prompts, texts):
        source = clauses_of(prompt_source(prompt))
        written = clauses_of(text)
        assert written and all(clause in source for clause in written), (text, source)
        assert len(written) == len(set(written))  # each clause at most once
    assert prompt_source(prompts[0]).startswith("60-year-old woman with chest pain. Axial CT of the chest")


def test_copy_constrained_decoding_begins_only_clauses_that_fit_the_token_budget():
    from medhash.services.backbones.llm import tiny_causal_lm

    model, tokenizer = tiny_causal_lm()
    long_clause = "A lesion " + " ".join(["extending into the adjacent wall"] * 12) + "."
    prompt = TEMPLATES["image_description"].fill({"Imaging": "Axial; CT.", "Findings": long_clause})
    budget = 12
    assert len(tokenizer(" " + long_clause, add_special_tokens=False)["input_ids"]) > budget
    generator = LocalLMGenerator(model, tokenizer, "tiny", max_new_tokens=budget, temperature=0.0, batch_size=1, copy=True)
    written = clauses_of(generator.generate([prompt])[0])
    assert written and set(written) <= {"Axial", "CT"}  # the long clause never begun, so the view is not empty


@pytest.mark.real
def test_local_gemma_generates_clean_text():
    cfg = AugmentConfig(generator="local", decoding="free", max_new_tokens=16, batch_size=2)
    generator = make_generator(cfg, LLMConfig())
    fields = [prompt_fields(with_report(IU_ABNORMAL)), prompt_fields(MEDPIX_STYLE)]
    texts = generator.generate([TEMPLATES["report_summary"].fill(f) for f in fields])
    assert generator.key == "local-gemma-3-270m-free-n16-t0"
    for text in texts:
        assert text.strip() and "\n\n" not in text and "<" not in text
        assert len(text.split()) <= 16
        sentences = [s.lower() for s in re.split(r"(?<=[.!?])\s+", text)]
        assert len(sentences) == len(set(sentences))


# --- grounded LLM views ---------------------------------------------------------------------------


class Writer:
    """A model-like generator: each view copies the source's first sentence, then adds ``extra``."""

    key, copies_source = "writer", False

    def __init__(self, extra: str):
        self.extra = extra

    def generate(self, prompts: list[str]) -> list[str]:
        return [f"{read_prompt(p)[1]['Findings'].split('. ')[0]}. {self.extra}" for p in prompts]


def grounded(view: str, source: str) -> Verdict:
    miner = FindingMiner()
    return verify(view, Source.of(source, miner), miner)


def test_a_view_keeps_what_its_source_states_and_drops_what_it_does_not():
    source = IU_ABNORMAL.sections["findings"]
    assert grounded("Small left pleural effusions; no pneumothorax.", source).dropped == ()  # copied, plural
    made_up = grounded("Small left pleural effusion. Severe pulmonary edema.", source)
    assert made_up.text == "Small left pleural effusion." and made_up.reason is None
    assert made_up.dropped[0][1].startswith("a finding the source does not state: edema")
    assert (made_up.findings, made_up.grounded) == (3, 2)  # pleural effusion and lung are stated; edema is not
    flipped = grounded("There is a pneumothorax.", source)
    assert flipped.reason == NOTHING_KEPT and "a negation flipped: pneumothorax" in flipped.dropped[0][1]
    outside_lexicon = grounded("A hypoechoic calcified granuloma.", source)  # a word the source never uses
    assert outside_lexicon.reason == NOTHING_KEPT and "words not in the source: hypoechoic" in outside_lexicon.dropped[0][1]
    assert grounded("Right upper lung granuloma, calcified, 4 cm.", source).reason == NOTHING_KEPT  # an invented size
    assert grounded("  ", source).reason == EMPTY


def test_an_llm_run_keeps_grounded_sentences_caches_what_was_written_and_counts_why():
    dataset, cfg = small_dataset(3), AugmentConfig(generator="openai", model="m", templates=("report_summary",))
    run = run_augmentation(dataset, cfg, LLMConfig(), progress=False, generator=Writer("Massive pulmonary embolism."))
    for item in dataset.items:
        first = item.sections.get("caption", item.sections.get("findings")).split(". ")[0] + "."
        assert run.texts[item.id]["report_summary"] == first  # the invented embolism is gone
    report = run.grounding["report_summary"]
    assert (report.kept, report.kept_in_part, sum(report.dropped.values())) == (3, 3, 0)
    assert report.dropped_sentences == {"a finding the source does not state": 3} and report.rate < 1
    cached = [json.loads(line)["text"] for line in run.cache_path.read_text().splitlines()]
    assert all(text.endswith("Massive pulmonary embolism.") for text in cached)  # the rules can change later

    nothing = run_augmentation(dataset, cfg, LLMConfig(), progress=False, generator=Writer("x"))
    assert nothing.cached == 3 and nothing.texts == run.texts  # cached raw text, checked again


@pytest.mark.real
def test_the_full_depth_gemma_writes_views_of_real_captions_and_only_grounded_ones_are_kept(shared_data):
    from medhash.services.config import DataConfig
    from medhash.services.data import open_dataset

    ids = ("MPX1201_synpic30961", "MPX1197_synpic46448", "MPX1278_synpic21143")
    dataset = open_dataset(DataConfig(dataset="medpix2", root=shared_data / "medpix2"), pairs_only=False)
    items = Dataset("medpix2-grounding-test", [item for item in dataset.items if item.id in ids], [])
    assert len(items.items) == 3
    cfg = AugmentConfig(generator="local", templates=("report_summary",), batch_size=3)
    generator = make_generator(cfg, LLMConfig(num_layers=2))  # training's cut-down depth is not the writer's
    assert generator.model.config.num_hidden_layers == 18 and generator.key == "local-gemma-3-270m-copy-n48-t0"
    run = run_augmentation(items, cfg, LLMConfig(num_layers=2), progress=False, generator=generator)
    report = run.grounding["report_summary"]
    assert report.kept + sum(report.dropped.values()) == 3 and report.findings > 0
    miner = FindingMiner()
    for item_id, views in run.texts.items():
        source = Source.of(source_text(next(i for i in items.items if i.id == item_id)), miner)
        assert verify(views["report_summary"], source, miner).dropped == ()  # every kept sentence is supported

    flow = next(item for item in items.items if item.id == ids[0])
    source = Source.of(source_text(flow), miner)
    assert verify("Chest CT demonstrating normal right pulmonary arterial flow.", source, miner).reason is None
    invented = "Pulmonary artery occlusion, mild pneumothorax and severe lung injury."  # what Gemma once wrote
    assert verify(invented, source, miner).reason == NOTHING_KEPT


# --- OpenAI-compatible endpoint ------------------------------------------------------------------


class ChatServer(ThreadingHTTPServer):
    """A tiny chat-completions server: answers with the first sentence of the prompt's findings."""

    def __init__(self, status: int = 200):
        super().__init__(("127.0.0.1", 0), ChatHandler)
        self.status, self.requests = status, []
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class ChatHandler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append((self.path, dict(self.headers), body))
        if self.server.status != 200:
            self.send_error(self.server.status)
            return
        prompt = body["messages"][0]["content"]
        findings = re.search(r"^Findings: (.+?[.!?])(?:\s|$)", prompt, re.MULTILINE)
        answer = {"choices": [{"index": 0, "message": {"role": "assistant", "content": findings.group(1)}}]}
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def chat_server():
    servers = []

    def start(status: int = 200) -> ChatServer:
        servers.append(ChatServer(status))
        return servers[-1]

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_openai_generator_against_a_local_server(chat_server, monkeypatch):
    server = chat_server()
    monkeypatch.setenv("TEST_LLM_KEY", "secret")
    cfg = AugmentConfig(generator="openai", endpoint=server.url + "/", model="med-llm", api_key_env="TEST_LLM_KEY",
                        max_new_tokens=32, templates=("report_summary",), batch_size=2)
    texts = augment_dataset(small_dataset(3), cfg, LLMConfig(), progress=False)
    assert texts["item-0"]["report_summary"] == "The cardiac silhouette and mediastinum size are within normal limits."
    assert texts["item-2"]["report_summary"] == MEDPIX_STYLE.sections["caption"].split(" No")[0]
    path, headers, body = server.requests[0]
    assert path == "/v1/chat/completions" and headers["Authorization"] == "Bearer secret"
    assert body["model"] == "med-llm" and body["max_tokens"] == 32 and body["temperature"] == 0.0
    assert body["messages"][0]["role"] == "user"
    assert read_prompt(body["messages"][0]["content"])[0].name == "report_summary"
    assert cache_path("unit", "openai-med-llm-n32-t0").is_file()


def test_openai_generator_errors(chat_server):
    def generator(url: str, model: str = "m") -> OpenAIGenerator:
        return OpenAIGenerator(url, model, "NO_SUCH_ENV", "k", 16, 0.0, timeout_s=5, retries=1, backoff_s=0.01)

    failing = chat_server(status=500)
    with pytest.raises(DataError, match=r"failed after 2 attempts: HTTP 500"):
        generator(failing.url).generate(["Findings: x."])
    assert len(failing.requests) == 2 and "Authorization" not in failing.requests[0][1]
    with pytest.raises(ConfigError, match="HTTP 404"):
        generator(chat_server(status=404).url).generate(["Findings: x."])
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(DataError, match="cannot connect"):
        generator(closed).generate(["Findings: x."])
    with pytest.raises(ConfigError, match="augment.model"):
        generator(failing.url, model="")


# --- real data -----------------------------------------------------------------------------------


@pytest.mark.real
def test_extractive_on_medpix_and_cli(shared_data, capsys):
    from medhash.services.cli import main
    from medhash.services.config import DataConfig
    from medhash.services.data import open_dataset

    dataset = open_dataset(DataConfig(dataset="medpix2", root=shared_data / "medpix2"), pairs_only=False)
    texts = augment_dataset(dataset, AugmentConfig(generator="extractive"), LLMConfig(), progress=False)
    assert len(texts) == sum(1 for it in dataset.items if it.report.strip()) > 2000
    assert all(len(views) == 3 and all(v.strip() for v in views.values()) for views in texts.values())
    negated = [it for it in dataset.items if re.match(r"No [a-z]+ [a-z]+\.$", it.report)]
    for item in negated:  # a caption that only says what is absent describes no abnormality
        assert texts[item.id]["image_description"].endswith("No abnormality is described.")

    argv = ["augment", "--dataset", "medpix2", "--root", str(shared_data / "medpix2"), "--limit", "5",
            "--generator", "extractive"]
    assert main(argv) == 0
    assert "5 items, 0 texts generated, 15 from cache" in capsys.readouterr().out
