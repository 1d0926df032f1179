"""The admin pages and the API docs in a real browser: Debian's Chromium (installed by
`make chromium`, a step of `make test`) driven headless by Playwright for Python, against
a real server on a small trained database (tests/admin_db.py). Each page must load with
no console error, no failed request and no request to another host; screenshots go to
the session's temporary folder (``<basetemp>/browser-artefacts``), not the repository."""
from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import urlparse

import pytest
from admin_db import admin_db, busiest_users
from conftest import copy_db

from polyrec import Engine
from polyrec.serve.app import create_app, start_background

CHROMIUM = os.environ.get("POLYREC_CHROMIUM", "/usr/bin/chromium")
#: headless and quiet: no GPU, no sandbox (root in CI), nothing fetched by the browser itself
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run",
        "--disable-default-apps", "--disable-extensions"]

if not Path(CHROMIUM).exists():  # CI installs it (make test -> make chromium): fail there
    if os.environ.get("CI"):
        raise RuntimeError(f"{CHROMIUM} is missing: `make chromium` installs it")
    pytest.skip(f"{CHROMIUM} is missing: run `make chromium`", allow_module_level=True)


@pytest.fixture(scope="module")
def site(tmp_path_factory, ml100k_default_db):
    built, _ = admin_db(tmp_path_factory, ml100k_default_db)
    db = copy_db(built, tmp_path_factory.mktemp("admin-browser"))
    with Engine(db, device="cpu", entrypoints=False, progress=False) as eng:
        user = busiest_users(eng, 1)[0]
        with start_background(create_app(eng, token="browser-token")) as server:
            yield server.url, user


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory) -> Path:
    folder = tmp_path_factory.getbasetemp() / "browser-artefacts"
    folder.mkdir(exist_ok=True)
    return folder


class Visit:
    """One page load: what the browser asked for, what failed, what the console said."""

    def __init__(self, browser, base: str) -> None:
        self.base = base
        self.page = browser.new_page(viewport={"width": 1280, "height": 900})
        self.requests: list[str] = []
        self.failed: list[str] = []
        self.errors: list[str] = []
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("requestfailed", lambda r: self.failed.append(f"{r.url} ({r.failure})"))
        self.page.on("response", lambda r: r.status >= 400 and self.failed.append(f"{r.url} ({r.status})"))
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))

    def open(self, path: str) -> "Visit":
        self.page.goto(self.base + path, wait_until="networkidle", timeout=120_000)
        return self

    def check_clean(self) -> None:
        """No console error, no failed request, nothing asked of another host."""
        own = urlparse(self.base).netloc
        outside = [u for u in self.requests  # blob: URLs of this origin (ReDoc's worker) are own
                   if not u.startswith("data:") and urlparse(u.removeprefix("blob:")).netloc != own]
        assert not outside, f"requests to other hosts: {outside}"
        assert not self.failed, f"failed requests: {self.failed}"
        assert not self.errors, f"console errors: {self.errors}"

    def shot(self, folder: Path, name: str) -> Path:
        path = folder / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        assert path.stat().st_size > 5_000
        return path


def pages(user: str) -> dict[str, tuple[str, list[str]]]:
    """name -> (path, selectors that must be visible)."""
    return {
        "overview": ("/", ["#counts .count", "#per-day svg rect.bar", "#encoders td",
                           "#checks td"]),
        "models": ("/admin/models", ["#live", "#metrics-chart svg polyline", "#versions tr.live",
                                     "form[action='/admin/models/activate'] input[type=password]"]),
        "experiments": ("/admin/experiments", ["section.experiment table.variants",
                                               "section.experiment svg circle.dot",
                                               "ul.verdict li"]),
        "preview": (f"/admin/preview?user={user}&q=comedy+from+the+90s&k=6",
                    ["#search .tag.slot", "#search img.thumb", "#recommendations li.card",
                     "#recommendations svg[aria-label='modality weights']", "#history li.card",
                     "#history img.thumb"]),
        "docs": ("/docs", [".swagger-ui .info .title", ".opblock-summary-path"]),
        "redoc": ("/redoc", ["[role=search] input, .menu-content", "h1"]),
    }


@pytest.fixture(scope="module")
def visits(site, browser):
    """Every page opened once (kept open for the tests): name -> Visit."""
    base, user = site
    opened = {name: Visit(browser, base).open(path) for name, (path, _) in pages(user).items()}
    yield opened
    for visit in opened.values():
        visit.page.close()


@pytest.mark.slow
def test_every_page_loads_clean_in_chromium(site, visits, artefacts):
    _, user = site
    for name, (_, selectors) in pages(user).items():
        visit = visits[name]
        for sel in selectors:  # the docs pages draw themselves after loading the schema
            visit.page.locator(sel).first.wait_for(state="visible", timeout=30_000)
        visit.check_clean()
        visit.shot(artefacts, f"admin-{name}")
    # every image on the preview was decoded by the browser (not a broken icon); they
    # load lazily: scroll them all into view first
    visit = visits["preview"]
    visit.page.evaluate("window.scrollTo(0, document.body.scrollHeight)")
    visit.page.wait_for_function("Array.from(document.images).every(i => i.complete)")
    widths = visit.page.eval_on_selector_all("img", "imgs => imgs.map(i => i.naturalWidth)")
    assert len(widths) > 10 and all(w > 0 for w in widths)
    visit.check_clean()


@pytest.mark.slow
def test_activate_and_roll_back_in_the_browser(site, browser, artefacts):
    base, _ = site
    visit = Visit(browser, base).open("/admin/models")
    try:
        page = visit.page
        assert page.inner_text("#live") == "v1"
        row = page.locator("#versions tr[data-version='2']")
        row.locator("input[type=password]").fill("wrong")
        row.locator("button").click()
        page.wait_for_load_state("networkidle")
        assert "write token is missing or wrong" in page.inner_text("#error")
        assert page.inner_text("#live") == "v1"
        visit.failed.clear()  # the 401 page was the expected answer, and the browser's
        visit.errors.clear()  # console says so
        row = page.locator("#versions tr[data-version='2']")
        row.locator("input[type=password]").fill("browser-token")
        row.locator("button").click()
        page.wait_for_load_state("networkidle")
        assert page.inner_text("#message") == "version 2 is live" and page.inner_text("#live") == "v2"
        page.locator("#rollback input[type=password]").fill("browser-token")
        page.locator("#rollback button").click()
        page.wait_for_load_state("networkidle")
        assert "rolled back from version 2 to 1" in page.inner_text("#message")
        assert page.inner_text("#live") == "v1"
        visit.check_clean()
    finally:
        visit.page.close()


@pytest.mark.slow
def test_no_page_references_an_external_url(site, visits):
    """The HTML of every page (as served and as rendered, so the docs' generated DOM too)
    and every stylesheet and script it loads: no http(s):// address of another host in
    our own pages and files; in the vendored Swagger UI / ReDoc bundles, no external
    address that the browser would load or link to (src, href, url(), @import)."""
    import httpx
    base, user = site
    own = urlparse(base).netloc
    external = re.compile(r"https?://(?!" + re.escape(own) + r")[\w.-]+")
    other = r"https?://(?!" + re.escape(own) + r")"
    loads = re.compile(r"""(?:src|href)\s*[:=]\s*["']""" + other + r"""|url\(\s*["']?""" + other
                       + r"""|@import\s+["']?(?:url\()?""" + other)
    for name, (path, _) in pages(user).items():
        visit = visits[name]
        served = httpx.get(base + path, timeout=120).text
        rendered = visit.page.content()
        if name in ("docs", "redoc"):  # the generated DOM holds API texts; check loads
            assert not external.findall(served), (name, external.findall(served))
            assert not loads.findall(rendered), (name, loads.findall(rendered))
        else:
            for html in (served, rendered):
                assert not external.findall(html), (name, external.findall(html))
        assets = [u for u in visit.requests if re.search(r"\.(css|js)(\?|$)", u)]
        assert assets, name
        for url in assets:
            body = httpx.get(url).text
            found = loads.findall(body) if "/docs-static/" in url else external.findall(body)
            assert not found, (url, found[:5])
