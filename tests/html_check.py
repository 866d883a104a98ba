"""Reading a report back the way a browser's tokenizer does (``html.parser``): is it well
formed, does it reach for anything outside itself, and what did it show as text."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections import Counter
from html.parser import HTMLParser
from typing import Any

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source"}
URL_ATTRIBUTES = {"src", "href", "action", "formaction", "poster", "srcset", "xlink:href", "data"}


class Page(HTMLParser):
    """Tags, nesting errors, every URL-valued attribute, script and style texts, and text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: Counter[str] = Counter()
        self.errors: list[str] = []
        self.urls: list[str] = []
        self.scripts: list[tuple[dict[str, str | None], str]] = []
        self.styles: list[str] = []
        self.texts: list[str] = []
        self.meta: list[dict[str, str | None]] = []
        self.open: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags[tag] += 1
        found = dict(attrs)
        self.urls += [v or "" for k, v in attrs if k in URL_ATTRIBUTES]
        if tag == "meta":
            self.meta.append(found)
        if tag not in VOID:
            self.open.append((tag, found))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags[tag] += 1
        self.urls += [v or "" for k, v in attrs if k in URL_ATTRIBUTES]

    def handle_endtag(self, tag: str) -> None:
        if not self.open or self.open[-1][0] != tag:
            self.errors.append(f"</{tag}> closes {self.open[-1][0] if self.open else 'nothing'}")
            return
        self.open.pop()

    def handle_data(self, data: str) -> None:
        if self.open and self.open[-1][0] == "script":
            self.scripts.append((self.open[-1][1], data))
        elif self.open and self.open[-1][0] == "style":
            self.styles.append(data)
        else:
            self.texts.append(data)

    @property
    def text(self) -> str:
        return "".join(self.texts)

    def data(self, block: str = "modelport-data") -> Any:
        """The JSON the page carries for tools (or another JSON block, by id)."""
        (payload,) = [s for a, s in self.scripts if a.get("id") == block]
        return json.loads(payload)

    def policy(self) -> str:
        (found,) = [m for m in self.meta if m.get("http-equiv") == "Content-Security-Policy"]
        return found["content"] or ""


def read_page(source: str) -> Page:
    page = Page()
    page.feed(source)
    page.close()
    return page


def assert_self_contained(page: Page) -> None:
    """Well formed, nothing fetched, one inline style and one inline script, both admitted
    by the page's own Content-Security-Policy and nothing else."""
    assert page.errors == [] and page.open == []
    assert all(url.startswith("#") for url in page.urls), page.urls
    for tag in ("link", "img", "iframe", "object", "embed", "base", "form", "audio", "video"):
        assert page.tags[tag] == 0, tag
    code = [s for a, s in page.scripts if a.get("type") != "application/json"]
    assert len(code) == 1 and len(page.styles) == 1
    assert page.tags["script"] == len(page.scripts)  # no script without text (no src)
    policy = page.policy()
    assert "default-src 'none'" in policy and "unsafe-inline" not in policy
    for kind, source in (("script-src", code[0]), ("style-src", page.styles[0])):
        digest = base64.b64encode(hashlib.sha256(source.encode()).digest()).decode()
        assert f"{kind} 'sha256-{digest}'" in policy, kind
    assert not re.search(r"https?://", code[0] + page.styles[0])
