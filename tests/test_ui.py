"""The Gradio front end: its handlers, then the whole system of `medhash demo` driven by a real browser,
`gradio_client` and a real Prometheus server scraping the API."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

from conftest import free_port
from medhash.services.config import load_config
from medhash.services.data import open_dataset
from medhash.services.features.featureset import limit_per_split
from medhash.ui.config import UIConfig, UIError
from medhash.ui.app import SearchApp, case_html, findings_line, highlighted, result_cards, users_from
from medhash.ui.client import SearchClient

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts" / "ui"  # screenshots of the browser test, kept after the run
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
USER, PASSWORD = "radiologist", "test-password"


def wait_for(condition, timeout_s: float, what: str, process: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the process exited ({process.returncode}) while waiting for {what}")
        try:
            value = condition()
            if value:
                return value
        except requests.RequestException:
            pass
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


# --- handlers, no service --------------------------------------------------------------------

def test_users_come_from_config_and_environment(monkeypatch):
    monkeypatch.setenv("MEDHASH_TEST_UI_USERS", "ann:pw1, bob:p:w2")
    cfg = UIConfig(users={"carl": "pw3"}, users_env="MEDHASH_TEST_UI_USERS")
    assert users_from(cfg) == [("ann", "pw1"), ("bob", "p:w2"), ("carl", "pw3")]
    monkeypatch.setenv("MEDHASH_TEST_UI_USERS", "no-password")
    with pytest.raises(UIError, match="user:password"):
        users_from(cfg)


def test_no_users_means_no_ui(monkeypatch):
    monkeypatch.delenv("MEDHASH_TEST_UI_USERS", raising=False)
    with pytest.raises(UIError, match="no open access"):
        users_from(UIConfig(users_env="MEDHASH_TEST_UI_USERS"))


def test_result_cards_show_every_field_and_escape_report_text():
    results = [{"id": "case_1", "modality": "text", "distance": 3, "labels": ["location:Head"], "patient_id": "P7",
                "study_id": "S9", "view": "Axial", "snippet": "<script>alert(1)</script> mass", "image_url": None}]
    cards = result_cards(results, {}, 64)
    assert "case_1" in cards and "61/64 bits agree" in cards and "location:Head" in cards and "tied" not in cards
    assert "patient P7" in cards and "study S9" in cards and "view Axial" in cards
    assert "<script>" not in cards and "&lt;script&gt;alert(1)&lt;/script&gt; mass" in cards
    assert "No results" in result_cards([], {}, 64)


def test_cards_mark_the_findings_a_hit_shares_with_the_query_and_the_status_names_them():
    snippet = "Right <b>pleural effusion</b> and a lung mass. " + "More text. " * 40
    start = snippet.index("pleural effusion")
    results = [{"id": "c1", "modality": "text", "distance": 1, "snippet": snippet,
                "shared_findings": [{"term": "pleural effusion", "category": "finding", "spans": [[start, start + 16]]},
                                    {"term": "mass", "category": "finding", "spans": [[snippet.index("mass"), snippet.index("mass") + 4]]}]}]
    cards = result_cards(results, {}, 64)
    assert "Shares with the query: pleural effusion, mass" in cards
    assert "&lt;b&gt;<mark>pleural effusion</mark>&lt;/b&gt; and a lung <mark>mass</mark>." in cards and cards.count("<mark>") == 2
    assert " …</p>" in cards and len(cards) < len(snippet) + 500  # cut at the card's length
    assert findings_line({"findings": ["pleural effusion"], "findings_from": "query text"}) == (
        ". Findings (the query text; marked in the reports): pleural effusion.")
    assert "agree on none" in findings_line({"findings": [], "findings_note": "its nearest reports agree on none"})
    assert highlighted("a mass", [[2, 6], [0, 40]]) == "a <mark>mass</mark>"  # spans beyond the text are ignored


def test_cards_say_when_a_similarity_is_shared():
    results = [{"id": f"case_{i}", "modality": "text", "distance": d} for i, d in enumerate((2, 2, 2, 5))]
    cards = result_cards(results, {}, 32).split("\n")
    assert "30/32 bits agree · tied with 2 others" in cards[0]
    assert "27/32 bits agree<div" in cards[3]


def test_an_opened_case_shows_the_whole_report_and_the_related_items_escaped():
    report = "<b>long</b> report " * 40
    html_text = case_html({"id": "c1", "patient_id": "P1", "study_id": "S1", "view": "PA", "labels": ["x:<y>"],
                           "snippet": report, "related": [{"id": "c2", "modality": "image", "view": "AP", "study_id": "S1"}]})
    assert "&lt;b&gt;long&lt;/b&gt; report " * 40 in html_text and "<b>long</b>" not in html_text
    assert "<li>c2 · image · AP · study S1</li>" in html_text and "x:&lt;y&gt;" in html_text
    assert "no other items indexed" in case_html({"id": "c3", "related": []})
    card = result_cards([{"id": "c1", "modality": "text", "distance": 0, "snippet": report}], {}, 16)
    assert "…" in card and len(card) < len(report) + 500  # a card shortens the report


def test_an_unreachable_api_and_empty_inputs_get_clear_messages(tmp_path):
    app = SearchApp(SearchClient(f"http://127.0.0.1:{free_port()}", timeout_s=5), UIConfig(max_upload_bytes=1024))
    status, gallery, cards, answer = app.search_text("pleural effusion", 10, "Images", [], "")
    assert "not reachable" in status and gallery == [] and cards == ""
    assert "Type a finding" in app.search_text("   ", 10, "Images", [], "")[0]
    assert "Upload an image" in app.search_image(None, 10, "Reports", [], "")[0]
    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * 2048)
    assert "larger than" in app.search_image(str(big), 10, "Reports", [], "")[0]


# --- the whole system: `medhash demo` ----------------------------------------------------------

@pytest.fixture(scope="module")
def demo(shared_data, tmp_path_factory):
    """A tiny trained run, then `medhash demo` (index, Serve, UI) in a child process, as a user starts it."""
    tmp = tmp_path_factory.mktemp("demo")
    raw = yaml.safe_load((ROOT / "training" / "configs" / "medpix2-lsch-tiny.yaml").read_text())
    raw["data"]["root"] = str(shared_data / "medpix2")
    raw["llm"]["name"] = "tiny-random"
    raw["train"].update(epochs=1, limit_items=40)
    raw["method_params"]["lsch"].update(align_epochs=1, rbm_epochs=1)
    (tmp / "cfg.yaml").write_text(yaml.safe_dump(raw))
    subprocess.run([sys.executable, "-m", "medhash.services.cli", "train", "--config", str(tmp / "cfg.yaml"),
                    "--out", str(tmp / "run")], check=True, timeout=900, capture_output=True)
    api_port, ui_port = free_port(), free_port()
    log = open(tmp / "demo.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "medhash.services.cli", "demo", "--run", str(tmp / "run"), "--limit", "60",
         "--milvus-uri", str(tmp / "index.db"), "--api-port", str(api_port), "--port", str(ui_port)],
        env={**os.environ, "MEDHASH_UI_USERS": f"{USER}:{PASSWORD}"}, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    dataset = open_dataset(load_config(tmp / "cfg.yaml").data)
    run_items = limit_per_split(dataset, raw["train"]["limit_items"]).items
    indexed_labels = [label for item in dataset.items[:60] for label in item.labels]  # what --limit 60 indexes
    system = {"api": f"http://127.0.0.1:{api_port}", "ui": f"http://127.0.0.1:{ui_port}", "process": process,
              "log": tmp / "demo.log", "run": tmp / "run", "judgments": tmp / "index.judgments.sqlite",
              "run_ids": {item.id for item in run_items}, "query_image": run_items[0].image_paths[0],
              "comma_label": next(label for label in indexed_labels if "," in label)}
    try:
        wait_for(lambda: requests.get(system["ui"], timeout=5).status_code == 200, 900, "the demo UI", process)
        yield system
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(180)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, 9)
        log.close()


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("Debian chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,2000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


def find_all(driver, css: str):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, css)


def log_in(driver, url: str, password: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    login = WebDriverWait(driver, 120).until(
        lambda d: d.find_elements(By.XPATH, "//button[normalize-space()='Login']"), "no login page")
    driver.find_element(By.CSS_SELECTOR, "input[type=text]").send_keys(USER)
    driver.find_element(By.CSS_SELECTOR, "input[type=password]").send_keys(password)
    login[0].click()


def upload_image(driver, image: Path) -> None:
    """Give the upload field ``image`` and wait until the page lists the uploaded file."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 60).until(lambda d: find_all(d, "#image-upload input[type=file]"))[0].send_keys(str(image))
    try:
        WebDriverWait(driver, 180).until(lambda d: image.name in d.page_source)
    except TimeoutException:
        driver.save_screenshot(str(ARTIFACTS / "upload-failed.png"))
        raise AssertionError(f"the page never listed the uploaded {image.name}") from None


@pytest.mark.real
def test_a_wrong_password_does_not_open_the_ui(demo, browser):
    log_in(browser, demo["ui"], "wrong-password")
    time.sleep(3)
    assert not find_all(browser, "#image-upload") and find_all(browser, "input[type=password]")
    assert requests.get(f"{demo['ui']}/config", timeout=10).status_code in (401, 403)  # nothing without a session


@pytest.mark.real
def test_in_a_browser_an_image_finds_reports_and_a_finding_finds_images(demo, browser, shared_data):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    log_in(browser, demo["ui"], PASSWORD)
    WebDriverWait(browser, 180).until(
        lambda d: "Connected" in d.find_element(By.ID, "service-status").text, "the UI did not reach the API")

    upload_image(browser, Path(demo["query_image"]))  # an image of a case the run was trained and evaluated on
    browser.find_element(By.ID, "image-search").click()
    cards = WebDriverWait(browser, 300).until(
        lambda d: find_all(d, "#image-results .medhash-card"), "no result cards for the image query")
    assert len(cards) == 10 and "bits agree" in cards[0].text and "text" in cards[0].text
    assert find_all(browser, "#image-results .medhash-card img")  # each report's study image as a thumbnail
    browser.save_screenshot(str(ARTIFACTS / "image-search.png"))

    # judge the first hit that is one of the run's items (so `medhash eval --judgments` can score it)
    choice = next(label for label in find_all(browser, "#image-judge-hit label")
                  if label.text.split()[1] in demo["run_ids"] and "(text)" in label.text)
    demo["judged"] = choice.text.split()[1]
    choice.click()
    case = WebDriverWait(browser, 120).until(  # choosing a hit opens it: full report, image, related items
        lambda d: "Same patient or study" in d.find_element(By.ID, "image-detail").text
        and d.find_element(By.ID, "image-detail").text, "the chosen hit did not open")
    assert demo["judged"] in case and find_all(browser, "#image-detail-image img")
    browser.save_screenshot(str(ARTIFACTS / "detail-view.png"))
    browser.find_element(By.ID, "image-relevant").click()
    saved = WebDriverWait(browser, 60).until(
        lambda d: "Saved" in d.find_element(By.ID, "image-judge-status").text, "the judgment was not saved")
    assert saved and f"judged relevant by {USER}" in browser.find_element(By.ID, "image-judge-status").text
    browser.save_screenshot(str(ARTIFACTS / "judgment-saved.png"))

    # a label with a comma in it (MedPix topics such as "topic:Neoplasm, benign") filters the image search as one label
    label = demo["comma_label"]
    find_all(browser, "#image-labels input")[0].click()
    WebDriverWait(browser, 60).until(lambda d: [o for o in find_all(d, "[data-testid=dropdown-option]") if o.text.strip() == label],
                                     f"{label} is not among the label choices")[0].click()
    find_all(browser, "#image-labels input")[0].send_keys(Keys.ESCAPE)  # close the choices
    browser.find_element(By.ID, "image-search").click()
    WebDriverWait(browser, 300).until(lambda d: f"; labels {label}" in d.find_element(By.ID, "image-status").text,
                                      "the comma label was not applied")
    cards = find_all(browser, "#image-results .medhash-card")
    assert cards and all(label in card.text for card in cards)
    browser.save_screenshot(str(ARTIFACTS / "comma-label.png"))

    next(t for t in find_all(browser, "button[role=tab]") if "findings" in t.text).click()
    query = WebDriverWait(browser, 60).until(lambda d: find_all(d, "#text-query textarea"), "no findings box")[0]
    query.send_keys("Axial CT of the chest: left lower lobe consolidation")
    browser.find_element(By.ID, "text-search").click()
    pictures = WebDriverWait(browser, 300).until(lambda d: find_all(d, "#text-gallery img"), "no gallery for the finding")
    assert len(pictures) >= 5
    status = browser.find_element(By.ID, "text-status").text
    assert "10 results (64-bit codes" in status
    # why this result: the query's findings are named, and every card that shares one marks it in its report
    assert "Findings (the query text; marked in the reports): consolidation, chest, lower lobe." in status
    for card in find_all(browser, "#text-results .medhash-card"):
        if "Shares with the query:" in card.text:
            shared = card.text.split("Shares with the query: ")[1].split("\n")[0].split(", ")
            marked = {mark.text.casefold() for mark in card.find_elements(By.TAG_NAME, "mark")}
            assert marked and set(shared) <= {"consolidation", "chest", "lower lobe"}, card.text
    browser.save_screenshot(str(ARTIFACTS / "text-search.png"))

    view = find_all(browser, "#text-view input")[0]  # the index's views are listed; typed in any case they match
    view.click()
    WebDriverWait(browser, 60).until(lambda d: any("Axial" in o.text for o in find_all(d, "[data-testid=dropdown-option]")),
                                     "no view choices")
    view.send_keys("axial", Keys.ENTER)  # typed, or the listed "Axial" it matches
    browser.find_element(By.ID, "text-search").click()
    WebDriverWait(browser, 300).until(lambda d: "; view axial;" in d.find_element(By.ID, "text-status").text.casefold(),
                                      "the view filter was not applied")
    cards = find_all(browser, "#text-results .medhash-card")
    assert cards and all("view axial" in card.text.casefold() for card in cards)
    browser.save_screenshot(str(ARTIFACTS / "view-filter.png"))


@pytest.mark.real
def test_in_a_browser_a_dicom_query_is_previewed_as_decoded_and_searched(demo, browser):
    from pydicom.data import get_testdata_file
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    ct = get_testdata_file("CT_small.dcm", download=False)
    if ct is None:
        pytest.skip("pydicom's CT_small.dcm test file is not installed")
    browser.get(demo["ui"])  # a fresh page, still signed in
    WebDriverWait(browser, 120).until(lambda d: find_all(d, "#image-upload"), "the UI did not load")
    upload_image(browser, Path(ct))
    info = WebDriverWait(browser, 120).until(
        lambda d: "DICOM CT" in d.find_element(By.ID, "image-preview-info").text
        and d.find_element(By.ID, "image-preview-info").text, "no preview of the DICOM query")
    assert "128 x 128 px" in info and "grayscale" in info
    assert find_all(browser, "#image-preview img")
    browser.find_element(By.ID, "image-search").click()
    WebDriverWait(browser, 300).until(lambda d: find_all(d, "#image-results .medhash-card"), "no results for the DICOM query")
    browser.save_screenshot(str(ARTIFACTS / "dicom-preview.png"))


@pytest.mark.real
def test_gradio_client_searches_and_bad_input_leaves_the_service_working(demo, shared_data, tmp_path):
    from gradio_client import Client, handle_file

    client = Client(demo["ui"] + "/", auth=(USER, PASSWORD), verbose=False)
    status, gallery, cards, *_ = client.predict("pleural effusion", 5, "Both", [], "", api_name="/search_text")
    assert status.startswith("5 results") and cards.count('class="medhash-card"') == 5

    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("this is not an image")
    status, _, cards, *_ = client.predict(handle_file(str(not_an_image)), 5, "Reports", [], "", api_name="/search_image")
    assert "refused the request (400)" in status and cards == ""

    image = sorted((shared_data / "medpix2" / "images").glob("*.png"))[1]
    status, _, cards, *_ = client.predict(handle_file(str(image)), 5, "Reports", [], "", api_name="/search_image")
    assert status.startswith("5 results") and cards.count('class="medhash-card"') == 5


@pytest.mark.real
def test_a_real_prometheus_scrapes_the_service(demo, tmp_path):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("Debian prometheus is not installed (apt-get install prometheus)")
    config = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    job = next(c for c in config["scrape_configs"] if c["job_name"] == "medhash")
    job["static_configs"] = [{"targets": [demo["api"].removeprefix("http://")]}]
    job["scrape_interval"] = "1s"
    config["scrape_configs"] = [job]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    server = subprocess.Popen(
        [binary, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        assert requests.post(f"{demo['api']}/search/text", json={"text": "hilar mass", "k": 3}, timeout=60).ok

        def scraped():
            answer = requests.get(f"http://127.0.0.1:{port}/api/v1/query", timeout=5,
                                  params={"query": 'medhash_requests_total{route="/search/text",status="200"}'})
            return answer.json()["data"]["result"]

        series = wait_for(scraped, 120, "Prometheus to scrape medhash_requests_total", server)
        assert float(series[0]["value"][1]) >= 1 and series[0]["metric"]["job"] == "medhash"
    finally:
        server.terminate()
        server.wait(30)


@pytest.mark.real
def test_stopping_the_demo_stops_the_service(demo):
    demo["process"].terminate()
    assert demo["process"].wait(180) == 0

    def api_down():
        try:
            requests.get(f"{demo['api']}/healthz", timeout=2)
        except requests.ConnectionError:
            return True
        return False

    wait_for(api_down, 120, "the API to stop")


@pytest.mark.real
def test_a_judgment_outlives_the_service_and_counts_in_eval(demo, tmp_path):
    """After the demo stopped (previous test): the browser's judgment is in the file and `medhash eval` scores it."""
    from medhash.services.judgments import read_judgments

    if "judged" not in demo:
        pytest.skip("the browser test did not run, so nothing was judged")
    rows = read_judgments(demo["judgments"])
    assert [(r.user, r.item_id, r.item_modality, r.verdict) for r in rows] == [(USER, demo["judged"], "text", "relevant")]
    done = subprocess.run([sys.executable, "-m", "medhash.services.cli", "eval", "--run", str(demo["run"]),
                           "--out", str(tmp_path / "eval"), "--judgments", str(demo["judgments"])],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "1 judgments of 1 hits; 1 queries found in the dataset, 0 not" in done.stdout
    assert "| 64 bits | I2T | 1 |" in done.stdout
