"""The clinician-facing Gradio app: search by image or by findings through the serving HTTP API.

Two tabs share the same controls (k, what to return, label and view filters). An image query
shows the most similar reports (and images); a findings query shows matching images in a gallery
and every result as a card: thumbnail, bits that agree with the query's code, labels, report text, patient and study ids.
Under the results the signed-in user can judge a hit relevant or not; the judgment goes to the API
with the query's fingerprint from the search answer (never the query itself).
The app holds no model and no index: everything goes through :class:`~medhash.ui.client.SearchClient`.
Nothing a user types or uploads is logged.
"""
from __future__ import annotations

import base64
import html
import io
import logging
import os
from collections import Counter
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a hospital network

import gradio as gr  # noqa: E402
from PIL import Image, UnidentifiedImageError  # noqa: E402

from medhash.ui.config import UIConfig, UIError  # noqa: E402
from medhash.ui.client import ApiError, SearchClient, SearchQuery  # noqa: E402

log = logging.getLogger(__name__)

THUMBNAIL_PX = 160
CARD_TEXT_CHARS = 300  # of the report on a result card; opening the hit shows all of it
DIRECTIONS = {"Reports": "reports", "Images": "images", "Both": "both"}
VERDICT_NAMES = {"relevant": "relevant", "not_relevant": "not relevant"}
CSS = """
.medhash-card {display: flex; gap: 12px; padding: 8px; border-bottom: 1px solid #ddd;}
.medhash-card img {width: 120px; height: 120px; object-fit: contain; background: #000;}
.medhash-card .meta, .medhash-case .meta {font-size: 0.85em; color: #555;}
.medhash-card .label, .medhash-case .label {display: inline-block; background: #eef; border-radius: 4px; padding: 0 4px; margin: 1px;}
.medhash-card .why {font-size: 0.85em; color: #7a4b00;}
.medhash-card mark, .medhash-case mark {background: #ffe58a; padding: 0 1px;}
"""


def users_from(cfg: UIConfig) -> list[tuple[str, str]]:
    """(user, password) pairs from ``cfg.users`` and the ``cfg.users_env`` variable; UIError if none."""
    users = dict(cfg.users)
    for pair in filter(None, (p.strip() for p in os.environ.get(cfg.users_env, "").split(","))):
        name, sep, password = pair.partition(":")
        if not sep or not name or not password:
            raise UIError(f"${cfg.users_env}: expected 'user:password' pairs separated by commas")
        users[name] = password
    if not users:
        raise UIError(f"no UI users configured: set ${cfg.users_env}='user:password' (the UI has no open access)")
    return sorted(users.items())


def thumbnail(png: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(png)).convert("RGB")
    image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    return image


def data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def agreement(distance: int, bits: int) -> str:
    """A Hamming distance as people read it: how many of the code's bits agree."""
    return f"{bits - distance}/{bits} bits agree"


def highlighted(text: str, spans: list, limit: int | None = None) -> str:
    """``text`` escaped, cut to ``limit`` characters (then " …"), with the character ``spans`` marked."""
    cut = text if limit is None or len(text) <= limit else text[:limit].rstrip()
    parts, at = [], 0
    for start, end in sorted((s, e) for s, e in spans if 0 <= s < e <= len(cut)):
        if start >= at:
            parts += [html.escape(cut[at:start]), f"<mark>{html.escape(cut[start:end])}</mark>"]
            at = end
    parts.append(html.escape(cut[at:]))
    return "".join(parts) + (" …" if cut != text else "")


def findings_line(query: dict) -> str:
    """What the status line says about the query's findings (from its text, or the hits' consensus)."""
    if "findings" not in query:
        return ""
    if not query["findings"]:
        return f". No shared findings shown: {query.get('findings_note') or 'none known'}."
    source = "the query text" if query.get("findings_from") == "query text" else "the hits' consensus"
    return f". Findings ({source}; marked in the reports): {', '.join(query['findings'])}."


def shared_spans(result: dict) -> list:
    """The spans of the findings ``result`` shares with the query, in its report text."""
    return [span for finding in result.get("shared_findings", []) for span in finding["spans"]]


def result_cards(results: list[dict], thumbnails: dict[str, Image.Image], bits: int) -> str:
    """HTML, one card per result, every field escaped. Results come ordered by distance, equal
    distances by id (the API's rule); a card says when its similarity is shared by others."""
    if not results:
        return "<p>No results: try fewer filters.</p>"
    ties = Counter(r["distance"] for r in results)
    cards = []
    for rank, r in enumerate(results, 1):
        image = thumbnails.get(r["id"])
        picture = f'<img src="{data_uri(image)}" alt="image of {html.escape(r["id"])}">' if image else ""
        labels = "".join(f'<span class="label">{html.escape(label)}</span>' for label in r.get("labels", []))
        shared = ", ".join(f["term"] for f in r.get("shared_findings", []))
        why = f'<div class="why">Shares with the query: {html.escape(shared)}</div>' if shared else ""
        tied = f" · tied with {ties[r['distance']] - 1} other{'s' if ties[r['distance']] > 2 else ''}" if ties[r["distance"]] > 1 else ""
        cards.append(
            f'<div class="medhash-card" data-id="{html.escape(r["id"])}">{picture}<div>'
            f'<b>#{rank} {html.escape(r["id"])}</b> · {html.escape(r["modality"])} · {agreement(r["distance"], bits)}{tied}'
            f'<div class="meta">patient {html.escape(r.get("patient_id") or "-")} · study {html.escape(r.get("study_id") or "-")}'
            f'{" · view " + html.escape(r["view"]) if r.get("view") else ""}</div>'
            f"<div>{labels}</div>{why}<p>{highlighted(r.get('snippet') or '', shared_spans(r), CARD_TEXT_CHARS)}</p></div></div>"
        )
    return "\n".join(cards)


def case_html(item: dict, marks: list | None = None) -> str:
    """An opened item: ids, view, labels, the whole stored report (``marks``: character spans to highlight)
    and its patient's / study's other items, escaped."""
    labels = "".join(f'<span class="label">{html.escape(label)}</span>' for label in item.get("labels", []))
    related = "".join(
        f"<li>{html.escape(r['id'])} · {html.escape(r['modality'])}{' · ' + html.escape(r['view']) if r.get('view') else ''}"
        f"{' · study ' + html.escape(r['study_id']) if r.get('study_id') else ''}</li>" for r in item.get("related", []))
    return (f'<div class="medhash-case"><h3>{html.escape(item["id"])}</h3>'
            f'<div class="meta">patient {html.escape(item.get("patient_id") or "-")} · study {html.escape(item.get("study_id") or "-")}'
            f'{" · view " + html.escape(item["view"]) if item.get("view") else ""}</div><div>{labels}</div>'
            f'<p>{highlighted(item["snippet"], marks or []) if item.get("snippet") else "(no report)"}</p>'
            f'<b>Same patient or study</b>{"<ul>" + related + "</ul>" if related else "<p>no other items indexed</p>"}</div>')


class SearchApp:
    """The handlers behind the Gradio components (plain functions of plain values, testable without a browser)."""

    def __init__(self, client: SearchClient, cfg: UIConfig):
        self.client, self.cfg = client, cfg

    def _present(self, answer: dict, query: SearchQuery) -> tuple[str, list, str, dict]:
        results, bits = answer["results"], answer["bits"]
        thumbnails = {}
        for r in results:
            if r.get("image_url") and r["id"] not in thumbnails:
                try:
                    thumbnails[r["id"]] = thumbnail(self.client.image(r["image_url"]))
                except (ApiError, UnidentifiedImageError, OSError):
                    pass  # the card shows without its picture
        gallery = [
            (thumbnails[r["id"]], f'{r["id"]} · {agreement(r["distance"], bits)}')
            for r in results if r["modality"] == "image" and r["id"] in thumbnails
        ]
        filters = "".join(f"; {name} {value}" for name, value in (("view", query.view), ("labels", ", ".join(query.labels))) if value)
        status = (f"{len(results)} results ({bits}-bit codes{filters}; equal similarity ordered by id)" if results
                  else f"No results{f' ({filters[2:]})' if filters else ''}")
        return status + findings_line(answer.get("query", {})), gallery, result_cards(results, thumbnails, bits), answer

    def _query(self, k, direction, labels, view) -> SearchQuery:
        return SearchQuery(
            k=max(1, min(int(k), self.cfg.max_k)), direction=DIRECTIONS.get(direction, "reports"),
            labels=tuple(labels or ()), view=(view or "").strip(),
        )

    def search_image(self, path: str | None, k, direction, labels, view) -> tuple[str, list, str, dict | None]:
        """(status line, gallery, result cards, the API's answer or None)."""
        if not path:
            return "Upload an image first (PNG, JPEG or DICOM).", [], "", None
        file = Path(path)
        if file.stat().st_size > self.cfg.max_upload_bytes:
            return f"The image is larger than the {self.cfg.max_upload_bytes // 2**20} MB limit.", [], "", None
        return self._run(lambda q: self.client.search_image(file.read_bytes(), file.name, q), k, direction, labels, view)

    def preview(self, path: str | None) -> tuple[Image.Image | None, str]:
        """The uploaded image as the service decodes it for the encoder, and a line saying what it is."""
        if not path:
            return None, ""
        file = Path(path)
        if file.stat().st_size > self.cfg.max_upload_bytes:
            return None, f"The image is larger than the {self.cfg.max_upload_bytes // 2**20} MB limit."
        try:
            about = self.client.preview(file.read_bytes(), file.name)
            image = Image.open(io.BytesIO(base64.b64decode(about["png_base64"]))).convert("RGB")
        except ApiError as exc:
            return None, str(exc)
        except (UnidentifiedImageError, OSError, ValueError, KeyError) as exc:
            log.error("preview failed: %s", type(exc).__name__)
            return None, "The preview could not be shown; the search may still work."
        kind = " ".join(filter(None, (about.get("format"), about.get("modality"), about.get("body_part"))))
        parts = [f"{about['width']} x {about['height']} px", kind, "colour" if about.get("colour") else "grayscale"]
        if about.get("window"):
            parts.append(f"window {about['window']}")
        return image, "As the model sees it: " + " · ".join(p for p in parts if p)

    def search_text(self, text: str | None, k, direction, labels, view) -> tuple[str, list, str, dict | None]:
        if not text or not text.strip():
            return "Type a finding first, e.g. 'left lower lobe consolidation'.", [], "", None
        return self._run(lambda q: self.client.search_text(text, q), k, direction, labels, view)

    def _run(self, search, k, direction, labels, view) -> tuple[str, list, str, dict | None]:
        try:
            query = self._query(k, direction, labels, view)
            return self._present(search(query), query)
        except ApiError as exc:
            return str(exc), [], "", None
        except Exception as exc:  # the page must always answer; the log gets the kind, never the input
            log.error("search failed: %s", type(exc).__name__)
            return "The search failed unexpectedly; please try again.", [], "", None

    def detail(self, answer: dict | None, rank: str | None) -> tuple[Image.Image | None, str]:
        """Hit number ``rank`` of ``answer`` opened: its full-size image and HTML with the whole report and
        the other items of the same patient or study."""
        if not answer or not rank or not str(rank).isdigit() or not 1 <= int(rank) <= len(answer.get("results", [])):
            return None, ""
        hit = answer["results"][int(rank) - 1]
        try:
            item = self.client.item(hit["id"])
        except ApiError as exc:
            return None, f"<p>{html.escape(str(exc))}</p>"
        image = None
        if item.get("image_url"):
            try:
                image = Image.open(io.BytesIO(self.client.image(item["image_url"]))).convert("RGB")
            except (ApiError, UnidentifiedImageError, OSError):
                pass  # the case shows without its picture
        same_text = item.get("snippet") == hit.get("snippet")  # the spans index the hit's report text
        return image, case_html(item, shared_spans(hit) if same_text else None)

    def judge(self, answer: dict | None, rank: str | None, verdict: str, user: str | None) -> str:
        """Store ``user``'s verdict on hit number ``rank`` (1-based) of the last search ``answer``; a status line."""
        if not answer or not answer.get("results"):
            return "Search first, then judge its hits."
        if not rank or not str(rank).isdigit() or not 1 <= int(rank) <= len(answer["results"]):
            return "Choose the hit to judge."
        if not user:
            return "Sign in to judge hits."
        hit = answer["results"][int(rank) - 1]
        try:
            self.client.judge(user, answer["query"], hit, verdict)
        except ApiError as exc:
            return str(exc)
        return f"Saved: hit #{rank} ({hit['id']}, {hit['modality']}) judged {VERDICT_NAMES[verdict]} by {user}."

    def filter_choices(self) -> tuple[dict, dict, dict, dict, str]:
        """The label and view filters' choices (the same on both tabs), and the service status line."""
        try:
            labels, views = self.client.labels(), self.client.views()
            health = self.client.health()
        except ApiError as exc:
            return *[gr.update(choices=[])] * 4, str(exc)
        records = max(health.get("records", {"": 0}).values())
        status = f"Connected: {records:,} records indexed per code length."
        return gr.update(choices=labels), gr.update(choices=views), gr.update(choices=labels), gr.update(choices=views), status


def _shown(handler):
    """``handler`` with its gallery hidden when it has no images (a reports-only answer), and the
    answer kept for judging its hits."""

    def run(*inputs):
        status, gallery, cards, answer = handler(*inputs)
        hits = [(f"#{rank} {r['id']} ({r['modality']})", str(rank)) for rank, r in enumerate((answer or {}).get("results", []), 1)]
        return (status, gr.update(value=gallery, visible=bool(gallery)), cards, answer,
                gr.update(choices=hits, value=None), "", None, "")

    return run


def _hit_panel(app: SearchApp, tab: str, answer: gr.State):
    """Under a tab's results: choose a hit to open it (full image, report, related items) and judge it."""
    with gr.Row():
        hit = gr.Radio([], label="Open and judge a hit of this search", elem_id=f"{tab}-judge-hit", scale=3)
        buttons = {verdict: gr.Button(name.capitalize(), elem_id=f"{tab}-{verdict.replace('_', '-')}", scale=1)
                   for verdict, name in VERDICT_NAMES.items()}
    status = gr.Markdown(elem_id=f"{tab}-judge-status")
    with gr.Row():
        image = gr.Image(label="Full-size image", interactive=False, elem_id=f"{tab}-detail-image", scale=1)
        case = gr.HTML(elem_id=f"{tab}-detail")
    hit.change(app.detail, [answer, hit], [image, case], api_name=False)
    for verdict, button in buttons.items():
        def judge(answer_value, rank, request: gr.Request, verdict=verdict):
            return app.judge(answer_value, rank, verdict, getattr(request, "username", None))

        button.click(judge, [answer, hit], status, api_name=False)
    return hit, status, image, case


def _controls(tab: str, default_direction: str, cfg: UIConfig):
    with gr.Row():
        k = gr.Slider(1, cfg.max_k, value=min(10, cfg.max_k), step=1, label="Results (k)")
        direction = gr.Radio(list(DIRECTIONS), value=default_direction, label="Return")
    with gr.Row():
        labels = gr.Dropdown([], multiselect=True, label="Every result must carry these labels", elem_id=f"{tab}-labels")
        view = gr.Dropdown([], value=None, allow_custom_value=True, label="View (any case; the index's views listed)",
                           elem_id=f"{tab}-view")
    return k, direction, labels, view


def build_ui(cfg: UIConfig, token: str | None = None) -> gr.Blocks:
    """The Gradio Blocks of the app, wired to the API at ``cfg.api_url``."""
    app = SearchApp(SearchClient(cfg.api_url, token, cfg.request_timeout_s), cfg)
    with gr.Blocks(title="medhash: medical image and report search", analytics_enabled=False) as blocks:
        gr.Markdown("# medhash\nSearch medical images and radiology reports by similarity (binary codes, Hamming distance).")
        service = gr.Markdown(elem_id="service-status")
        with gr.Tab("Search by image"):
            with gr.Row():
                upload = gr.File(label="Query image (PNG, JPEG or DICOM)", file_types=[".png", ".jpg", ".jpeg", ".dcm"],
                                 type="filepath", elem_id="image-upload", scale=2)
                preview = gr.Image(label="Query as decoded", interactive=False, elem_id="image-preview", height=280,
                                   scale=1)
            preview_info = gr.Markdown(elem_id="image-preview-info")
            image_controls = _controls("image", "Reports", cfg)
            image_button = gr.Button("Search", variant="primary", elem_id="image-search")
            image_status = gr.Markdown(elem_id="image-status")
            image_gallery = gr.Gallery(label="Similar images", columns=5, height="auto", elem_id="image-gallery",
                                       visible=False)
            image_cards = gr.HTML(elem_id="image-results")
            image_answer = gr.State(None)
            image_hit, image_judged, image_detail, image_case = _hit_panel(app, "image", image_answer)
        with gr.Tab("Search by findings"):
            text = gr.Textbox(label="Findings", placeholder="left lower lobe consolidation", lines=3, elem_id="text-query")
            text_controls = _controls("text", "Images", cfg)
            text_button = gr.Button("Search", variant="primary", elem_id="text-search")
            text_status = gr.Markdown(elem_id="text-status")
            text_gallery = gr.Gallery(label="Matching images", columns=5, height="auto", elem_id="text-gallery",
                                      visible=False)
            text_cards = gr.HTML(elem_id="text-results")
            text_answer = gr.State(None)
            text_hit, text_judged, text_detail, text_case = _hit_panel(app, "text", text_answer)
        image_outputs = [image_status, image_gallery, image_cards, image_answer, image_hit, image_judged, image_detail,
                         image_case]
        text_outputs = [text_status, text_gallery, text_cards, text_answer, text_hit, text_judged, text_detail, text_case]
        upload.change(app.preview, upload, [preview, preview_info], api_name=False)
        image_button.click(_shown(app.search_image), [upload, *image_controls], image_outputs, api_name="search_image")
        text_button.click(_shown(app.search_text), [text, *text_controls], text_outputs, api_name="search_text")
        text.submit(_shown(app.search_text), [text, *text_controls], text_outputs, api_name=False)
        blocks.load(app.filter_choices, None, [*image_controls[2:], *text_controls[2:], service], api_name=False)
    return blocks


def launch(cfg: UIConfig, token: str | None = None, open_browser: bool = False, block: bool = True) -> gr.Blocks:
    """Serve the app on ``cfg.host:cfg.port`` behind a login; returns the running Blocks."""
    users = users_from(cfg)
    blocks = build_ui(cfg, token)
    blocks.launch(
        server_name=cfg.host, server_port=cfg.port, auth=users, auth_message="medhash: sign in to search",
        max_file_size=cfg.max_upload_bytes, inbrowser=open_browser, prevent_thread_lock=not block,
        show_error=False, quiet=True, css=CSS,
    )
    return blocks
