"""The book: it builds from the committed results with every warning an error (`make book-build`, the build step
of `make book`), and its pages render in a real browser (Debian's chromium driven by Playwright) with no error
output, no broken image, no unrendered TeX and no request to the network."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
# myst-nb's classes for a cell's stderr and traceback outputs (myst_nb/core/render.py; tracebacks are highlighted
# with the ipythontb lexer), docutils' for a markup error left in the page
ERROR_OUTPUT = ".output.stderr, .output.traceback, [class*='highlight-ipythontb'], .system-message, .problematic"
LOCAL_SCHEMES = ("file:", "data:", "blob:", "about:")
# text nodes outside code, where a `$$` or `\(` would be TeX that MathJax did not typeset
RAW_TEX = """() => {
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  const found = [];
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    if (node.parentElement.closest("pre, code, script, style, mjx-container")) continue;
    if (/\\$\\$|\\\\\\(|\\\\\\[/.test(node.textContent)) found.push(node.textContent.trim().slice(0, 80));
  }
  return found;
}"""


def toc_files() -> list[str]:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    return [toc["root"]] + [ch["file"] for part in toc["parts"] for ch in part["chapters"]]


@pytest.fixture(scope="session")
def book_html(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the book once per session, exactly as `make book` does its build step, into a temporary folder."""
    out = tmp_path_factory.mktemp("book")
    cmd = ["make", "--no-print-directory", "book-build", f"PY={sys.executable}", f"BOOK_OUT={out}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    log = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, f"`{' '.join(cmd)}` failed (warnings are errors):\n{log}"
    return out / "_build" / "html"


@pytest.fixture(scope="session")
def browser():
    if not Path(CHROMIUM).exists():
        if shutil.which("apt-get") is None:
            pytest.skip(f"no chromium at {CHROMIUM} and no apt-get to install it: the browser checks cannot run")
        pytest.fail("chromium is missing: `make test` installs it (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def test_every_toc_page_is_built(book_html: Path) -> None:
    missing = [f for f in toc_files() if not (book_html / f"{f}.html").is_file()]
    assert not missing, f"pages of _toc.yml without HTML: {missing}"
    assert not (book_html / "book" / "experiments").exists(), "the experiment templates must not be pages"


def test_no_page_loads_from_the_network(book_html: Path) -> None:
    remote = re.compile(r'<(script|link)[^>]*(src|href)="(https?:)?//[^"]*"')
    found = {str(p.relative_to(book_html)): m.group(0) for p in book_html.rglob("*.html")
             if (m := remote.search(p.read_text(encoding="utf-8")))}
    assert not found, f"scripts or stylesheets from the network: {found}"
    assert (book_html / "_static" / "mathjax" / "tex-chtml.js").is_file(), "MathJax is not served by the book"


# the home page, an artefact page, and a page with displayed equations (MathJax)
@pytest.mark.parametrize("page_name", ["book/index", "book/fig1_main", "book/principle"])
def test_page_renders_in_chromium(book_html: Path, browser, page_name: str, tmp_path: Path) -> None:
    path = book_html / f"{page_name}.html"
    assert path.is_file(), f"{path} was not built"
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    remote, failed, errors = [], [], []
    page.on("request", lambda r: None if r.url.startswith(LOCAL_SCHEMES) else remote.append(r.url))
    page.on("requestfailed", lambda r: failed.append(f"{r.url}: {r.failure}"))
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.route(re.compile(r"^(https?|wss?|ftp):"), lambda route: route.abort())  # never reach the network
    try:
        page.goto(path.as_uri(), wait_until="load")
        if page.locator(".math").count():
            page.wait_for_function("() => window.MathJax && MathJax.startup && MathJax.startup.promise")
            page.evaluate("() => MathJax.startup.promise")
            untypeset = page.evaluate("""() => [...document.querySelectorAll('.math')]
                .filter(e => !e.querySelector('mjx-container')).map(e => e.textContent.slice(0, 80))""")
            assert not untypeset, f"math that MathJax did not typeset: {untypeset}"
        assert not page.evaluate(RAW_TEX), f"raw TeX in the page text: {page.evaluate(RAW_TEX)}"
        broken = page.evaluate("""() => [...document.images]
            .filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.getAttribute('src'))""")
        assert not broken, f"images that did not load: {broken}"
        bad = page.locator(ERROR_OUTPUT)
        assert not bad.count(), f"error output in the page: {bad.all_inner_texts()[:3]}"
        page.screenshot(path=tmp_path / f"{page_name.replace('/', '_')}.png", full_page=True)
    finally:
        context.close()
    assert not remote, f"requests to the network: {remote}"
    assert not failed, f"failed requests: {failed}"
    assert not errors, f"JavaScript errors: {errors}"
