"""The serving HTTP API as the front end sees it: searches, labels, images and health, with clear errors."""
from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote

import requests


class ApiError(Exception):
    """The search service refused a request or cannot be reached; the message is for the user."""


@dataclass(frozen=True)
class SearchQuery:
    """Search options shared by image and text queries."""

    k: int = 10
    direction: str = "reports"  # reports | images | both
    labels: tuple[str, ...] = ()
    view: str = ""


class SearchClient:
    """A thin client of the medhash API at ``url`` (bearer ``token`` when the API requires one)."""

    def __init__(self, url: str, token: str | None = None, timeout_s: float = 60.0):
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.session = requests.Session()
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"

    def _call(self, method: str, path: str, **kwargs) -> requests.Response:
        try:
            answer = self.session.request(method, self.url + path, timeout=self.timeout_s, **kwargs)
        except requests.ConnectionError as exc:
            raise ApiError(f"The search service at {self.url} is not reachable; is `medhash serve` running?") from exc
        except requests.Timeout as exc:
            raise ApiError(f"The search service at {self.url} did not answer within {self.timeout_s:.0f} s") from exc
        if answer.status_code >= 400:
            try:
                message = answer.json().get("error") or answer.text
            except ValueError:
                message = answer.text[:200]
            raise ApiError(f"The search service refused the request ({answer.status_code}): {message}")
        return answer

    def health(self) -> dict:
        return self._call("GET", "/healthz").json()

    def labels(self) -> list[str]:
        return self._call("GET", "/labels").json()["labels"]

    def views(self) -> list[str]:
        return self._call("GET", "/views").json()["views"]

    def search_image(self, data: bytes, filename: str, query: SearchQuery) -> dict:
        """The API's answer: ``bits`` (the code length searched), ``direction`` and ``results``."""
        form = {"k": query.k, "direction": query.direction, "labels": list(query.labels)}  # one field per label
        if query.view:
            form["view"] = query.view
        return self._call("POST", "/search/image", files={"file": (filename, data)}, data=form).json()

    def preview(self, data: bytes, filename: str) -> dict:
        """The image as the service decodes it: ``png_base64`` (at most 512 px) and its size, format, modality."""
        return self._call("POST", "/preview", files={"file": (filename, data)}).json()

    def search_text(self, text: str, query: SearchQuery) -> dict:
        """As :meth:`search_image`, for report text."""
        body = {"text": text, "k": query.k, "direction": query.direction, "labels": list(query.labels)}
        if query.view:
            body["view"] = query.view
        return self._call("POST", "/search/text", json=body).json()

    def judge(self, user: str, query: dict, hit: dict, verdict: str) -> dict:
        """Store ``user``'s ``verdict`` (relevant | not_relevant) on ``hit`` of the search answer whose ``query`` it was."""
        body = {"user": user, "query_modality": query["modality"], "query_sha256": query["sha256"],
                "item_id": hit["id"], "item_modality": hit["modality"], "verdict": verdict}
        return self._call("POST", "/judgments", json=body).json()

    def item(self, item_id: str) -> dict:
        """One indexed item: metadata, report, modalities, ``image_url`` and the ``related`` items of its patient or study."""
        return self._call("GET", f"/items/{quote(item_id, safe='')}").json()

    def image(self, image_url: str) -> bytes:
        """The PNG bytes behind a result's ``image_url`` (a path on the API)."""
        return self._call("GET", image_url).content
