"""Render every page of the built book in headless Debian chromium and check what a reader sees.

    python tests/check_site.py [SITE_DIR] [--screenshots DIR] [--mathjax DIR]

SITE_DIR defaults to _build/html. Each page is served from a local HTTP server and rendered by
/usr/bin/chromium (through Playwright, with a fresh profile). The check fails, naming the page,
on: a missing local image (no file, or naturalWidth 0 after load), a local resource that
answers 404, an internal link to a page that does not exist or to an #anchor with no element of
that id, a page with Sphinx math markup where MathJax did not render it (no `mjx-container`, or
a TeX error), and TeX shown as text (`\\(`, `$$`, `\\lambda`... outside code and math). One
full-page PNG per page goes to SITE_DIR/../screenshots.

The site loads MathJax 3 from a CDN; the checker answers those requests from a local copy
installed from npm (`npm install --prefix .cache/site-check mathjax@3`, done by
`make site-check`) and aborts every other external request, so that it runs offline.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import mimetypes
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
DEFAULT_MATHJAX = ROOT / ".cache" / "site-check" / "node_modules" / "mathjax"
MATHJAX_CDN = re.compile(r"^https?://[^/]+/(?:npm/)?mathjax@3[^/]*/(?P<path>[^?#]+)")
VIEWPORT = {"width": 1280, "height": 900}

# Runs in the page: lazy images are loaded at once and decoded before they are inspected.
IMAGES_JS = """async () => {
  const imgs = [...document.images];
  imgs.forEach(img => { img.loading = 'eager'; });
  await Promise.all(imgs.map(img => img.decode().catch(() => null)));
  return imgs.map(img => ({src: img.currentSrc || img.src, attr: img.getAttribute('src') || '',
                           width: img.naturalWidth, complete: img.complete}));
}"""
LINKS_JS = """() => [...document.querySelectorAll('a[href]')].map(a => ({
  href: a.href, attr: a.getAttribute('href')}))"""
IDS_JS = """() => [...document.querySelectorAll('[id], a[name]')].map(e => e.id || e.name)"""
MATH_MARKUP_JS = """() => [...document.querySelectorAll('.math')]
  .filter(e => !e.closest('pre, code, .highlight')).length"""
# After MathJax: .math elements left without output, and TeX errors.
MATH_RESULT_JS = r"""() => {
  const math = [...document.querySelectorAll('.math')].filter(e => !e.closest('pre, code, .highlight'));
  const unrendered = math.filter(e => !e.querySelector('mjx-container') && e.tagName !== 'MJX-CONTAINER')
    .map(e => e.textContent.trim().slice(0, 60));
  const errors = [...document.querySelectorAll('mjx-merror')].map(e => e.textContent.trim().slice(0, 60));
  // display equations wider than the text column are cut off (or need a scroll bar)
  const wide = [...document.querySelectorAll('mjx-container[display="true"]')].filter(c => {
    const m = c.querySelector('mjx-math'), column = c.closest('article') || document.body;
    if (!m) return false;
    const box = m.getBoundingClientRect(), edge = column.getBoundingClientRect();
    return box.right > edge.right + 1 || box.left < edge.left - 1;
  }).map(c => (c.querySelector('mjx-assistive-mml') || c).textContent.trim().slice(0, 60));
  return {rendered: document.querySelectorAll('mjx-container').length, unrendered, errors, wide};
}"""
# TeX shown as text: delimiters, a $ next to TeX, or a TeX command, outside code and math.
RAW_TEX_JS = r"""() => {
  const tex = /\\\(|\\\[|\$\$|\\[A-Za-z]{2,}|\$[A-Za-z\\{^_]|[A-Za-z}]\$/;
  const raw = [];
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    const parent = node.parentElement;
    if (!parent || parent.closest('pre, code, kbd, script, style, textarea, .highlight, .math, mjx-container')) continue;
    const match = node.textContent.match(tex);
    if (match) raw.push(node.textContent.slice(Math.max(0, match.index - 30), match.index + 30).trim());
  }
  return raw;
}"""


@dataclass
class PageReport:
    """What was checked on one page and what is wrong with it."""

    name: str
    problems: list[str] = field(default_factory=list)
    images: int = 0
    external_images: int = 0
    internal_links: int = 0
    math_markup: int = 0
    math_rendered: int = 0
    seconds: float = 0.0
    note: str = ""

    def summary(self) -> str:
        if self.note:
            return f"{self.name}: {self.note}"
        status = "OK  " if not self.problems else "FAIL"
        ext = f" (+{self.external_images} external, not loaded offline)" if self.external_images else ""
        math = f"math {self.math_rendered} rendered / {self.math_markup} marked up" if self.math_markup else "no math"
        return (f"{status} {self.name}: {self.images} images{ext}, {self.internal_links} internal links, "
                f"{math}, {self.seconds:.1f} s")


class _AnchorParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.anchors: set[str] = set()
        self.redirect: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        for key in ("id", "name") if tag == "a" else ("id",):
            if values.get(key):
                self.anchors.add(values[key] or "")
        if tag == "meta" and (values.get("http-equiv") or "").lower() == "refresh":
            match = re.search(r"url=(\S+)", values.get("content") or "", re.I)
            self.redirect = match.group(1).strip("'\"") if match else None


@functools.lru_cache(maxsize=None)
def parse_html(path: Path) -> _AnchorParser:
    """The ids (and <a name>) of a built page, and its meta-refresh target if it has one."""
    parser = _AnchorParser()
    parser.feed(path.read_text(encoding="utf-8", errors="replace"))
    return parser


def find_pages(site: Path) -> list[Path]:
    """Every HTML page of the build, leaving out Sphinx's asset folders (_static, _sources...)."""
    return sorted(p for p in site.rglob("*.html")
                  if not any(part.startswith("_") for part in p.relative_to(site).parts[:-1]))


def local_target(site: Path, url_path: str) -> Path:
    target = site / unquote(url_path).lstrip("/")
    return target / "index.html" if url_path.endswith("/") or target.is_dir() else target


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def serve(site: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    """Serve the site on a free local port, in a daemon thread."""
    handler = functools.partial(_QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def make_router(origin: str, mathjax: Path | None):
    """Let the local site through, answer MathJax CDN requests from `mathjax`, abort the rest."""

    def route(route, request) -> None:
        url = request.url
        if url.startswith(origin + "/"):
            return route.continue_()
        match = MATHJAX_CDN.match(url)
        if match and mathjax is not None:
            local = mathjax / match["path"]
            if local.is_file():
                kind = mimetypes.guess_type(local.name)[0] or "application/octet-stream"
                return route.fulfill(status=200, body=local.read_bytes(), content_type=kind,
                                     headers={"Access-Control-Allow-Origin": "*"})
            return route.fulfill(status=404, body=b"not in the local MathJax copy")
        return route.abort()

    return route


def check_links(report: PageReport, links: list[dict], page_path: Path, page_ids: set[str],
                site: Path, origin: str) -> None:
    for link in links:
        parts = urlsplit(link["href"])
        if f"{parts.scheme}://{parts.netloc}" != origin:
            continue
        report.internal_links += 1
        target = local_target(site, parts.path)
        if not target.is_file():
            report.problems.append(f"broken link {link['attr']!r}: {target.relative_to(site)} does not exist")
            continue
        if not parts.fragment or target.suffix != ".html":
            continue
        anchor = unquote(parts.fragment)
        ids = page_ids if target == page_path else parse_html(target).anchors
        if anchor not in ids:
            report.problems.append(f"broken link {link['attr']!r}: no element with id {anchor!r} "
                                   f"in {target.relative_to(site)}")


def check_page(context, site: Path, page_path: Path, origin: str, shots: Path,
               math_timeout_s: float) -> PageReport:
    name = page_path.relative_to(site).as_posix()
    report = PageReport(name)
    redirect = parse_html(page_path).redirect
    if redirect:
        target = local_target(site, urlsplit(f"{origin}/{name}").path.rsplit("/", 1)[0] + "/" + redirect)
        report.note = f"redirect to {redirect}" + ("" if target.is_file() else " (MISSING)")
        if not target.is_file():
            report.problems.append(f"redirects to {redirect}, which does not exist")
        return report

    start = time.perf_counter()
    page = context.new_page()
    bad_responses: list[str] = []
    failed: list[str] = []
    page.on("response", lambda r: bad_responses.append(f"{r.status} {r.url}")
            if r.url.startswith(origin) and r.status >= 400 else None)
    page.on("requestfailed", lambda r: failed.append(r.url))
    try:
        page.goto(f"{origin}/{name}", wait_until="load", timeout=60_000)
        missing_images = set()
        for image in page.evaluate(IMAGES_JS):
            if not image["src"].startswith(origin):
                report.external_images += 1
                continue
            report.images += 1
            if image["width"] == 0:
                target = local_target(site, urlsplit(image["src"]).path)
                why = "file does not exist" if not target.is_file() else "does not decode (naturalWidth 0)"
                report.problems.append(f"missing image {image['attr']!r}: {why}")
                missing_images.add(image["src"])
        report.problems += [f"local resource missing: {r.replace(origin + '/', '')}" for r in bad_responses
                            if r.split(" ", 1)[1] not in missing_images]
        page_ids = set(page.evaluate(IDS_JS))
        check_links(report, page.evaluate(LINKS_JS), page_path, page_ids, site, origin)
        report.math_markup = page.evaluate(MATH_MARKUP_JS)
        if report.math_markup:
            check_math(page, report, failed, math_timeout_s)
        report.problems += [f"raw TeX in the text: {text!r}" for text in page.evaluate(RAW_TEX_JS)[:5]]
        page.evaluate("() => document.fonts.ready.then(() => true)")
        page.wait_for_timeout(250)  # let the theme's layout settle before the capture
        shot = shots / Path(name).with_suffix(".png")
        shot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(shot), full_page=True)
    finally:
        page.close()
    report.problems = list(dict.fromkeys(report.problems))
    report.seconds = time.perf_counter() - start
    return report


def check_math(page, report: PageReport, failed: list[str], timeout_s: float) -> None:
    """Wait for MathJax's first typeset, then check that every piece of math was rendered."""
    if any("mathjax" in url.lower() for url in failed):
        report.problems.append(f"{report.math_markup} math elements but MathJax did not load")
        return
    try:
        page.wait_for_function("() => window.MathJax && MathJax.startup && MathJax.startup.promise",
                               timeout=timeout_s * 1000)
        page.evaluate("() => MathJax.startup.promise.then(() => true)")
    except Exception as error:  # Playwright's TimeoutError, or a MathJax startup failure
        report.problems.append(f"{report.math_markup} math elements but MathJax did not start "
                               f"within {timeout_s:.0f} s ({type(error).__name__})")
        return
    result = page.evaluate(MATH_RESULT_JS)
    report.math_rendered = result["rendered"]
    if result["rendered"] == 0:
        report.problems.append(f"{report.math_markup} math elements, none rendered (no mjx-container)")
    for text in result["unrendered"][:5]:
        report.problems.append(f"math not rendered: {text!r}")
    for text in result["errors"][:5]:
        report.problems.append(f"TeX error: {text!r}")
    for text in result["wide"][:5]:
        report.problems.append(f"display math wider than the text column (cut off): {text!r}; "
                               "break it over lines (aligned) or shorten it")


def check_site(site: Path, shots: Path, mathjax: Path | None, math_timeout_s: float = 20.0,
               pages: list[Path] | None = None) -> list[PageReport]:
    """Check every page of `site` (or `pages`) and return one report per page.

    `mathjax` is the folder of the npm package (with es5/); None blocks MathJax.
    """
    from playwright.sync_api import sync_playwright

    server, origin = serve(site)
    try:
        with sync_playwright() as playwright:
            # Playwright gives each launch a fresh, temporary user-data-dir.
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                                 args=CHROMIUM_ARGS)
            context = browser.new_context(viewport=VIEWPORT, service_workers="block")
            context.route("**/*", make_router(origin, mathjax))
            reports = []
            for page_path in pages or find_pages(site):
                reports.append(check_page(context, site, page_path, origin, shots, math_timeout_s))
                print(reports[-1].summary(), flush=True)
            browser.close()
    finally:
        server.shutdown()
    return reports


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("site", nargs="?", type=Path, default=ROOT / "_build" / "html")
    parser.add_argument("--screenshots", type=Path, help="default: SITE/../screenshots")
    parser.add_argument("--mathjax", type=Path, default=DEFAULT_MATHJAX,
                        help="the npm package mathjax@3 (default: .cache/site-check/node_modules/mathjax)")
    parser.add_argument("--block-mathjax", action="store_true", help="serve no MathJax (to see the check fail)")
    parser.add_argument("--math-timeout", type=float, default=20.0, help="seconds to wait for MathJax")
    args = parser.parse_args(argv)

    site = args.site.resolve()
    if not (site / "index.html").is_file() and not find_pages(site):
        sys.exit(f"check_site: no HTML pages in {site}: build the book first (make book-strict)")
    if not CHROMIUM.exists():
        sys.exit("check_site: /usr/bin/chromium is missing: install Debian's chromium: apt-get install chromium")
    mathjax = None if args.block_mathjax else args.mathjax.resolve()
    if mathjax is not None and not (mathjax / "es5" / "tex-mml-chtml.js").is_file():
        sys.exit(f"check_site: no MathJax 3 in {mathjax}: "
                 "npm install --prefix .cache/site-check mathjax@3 (make site-check does it)")
    try:
        import playwright  # noqa: F401
    except ImportError:
        sys.exit("check_site: Playwright is missing: pip install --no-deps -r requirements.lock")
    shots = (args.screenshots or site.parent / "screenshots").resolve()

    start = time.perf_counter()
    reports = check_site(site, shots, mathjax, args.math_timeout)
    failing = [r for r in reports if r.problems]
    for report in failing:
        print(f"\n{report.name}:", file=sys.stderr)
        for problem in report.problems:
            print(f"  - {problem}", file=sys.stderr)
    print(f"\ncheck_site: {len(reports)} pages, {len(failing)} with problems, "
          f"{time.perf_counter() - start:.0f} s; screenshots in {shots}")
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
