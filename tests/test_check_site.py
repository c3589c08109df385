"""tests/check_site.py passes a good page and names each fault of a broken one.

The pages are a tiny fake site; MathJax is a stub that marks `.math` elements as rendered,
served in place of the CDN script, so the test needs chromium but neither npm nor the network.
"""

import importlib.util
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("check_site", HERE / "check_site.py")
check_site = sys.modules["check_site"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_site)

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not check_site.CHROMIUM.exists(),
                                reason="Debian's chromium is not installed (apt-get install chromium)")]

MATHJAX_TAG = '<script defer src="https://cdn.jsdelivr.net/npm/mathjax@3/es5/tex-mml-chtml.js"></script>'
STUB_MATHJAX = """
document.querySelectorAll('.math:not(.stub-ignore)').forEach(e => {
  e.innerHTML = '<mjx-container>x</mjx-container>'; });
window.MathJax = {startup: {promise: Promise.resolve()}};
"""
SVG = '<svg xmlns="http://www.w3.org/2000/svg" width="20" height="10"><rect width="20" height="10"/></svg>'


def page(body: str, math: bool = True) -> str:
    head = MATHJAX_TAG if math else ""
    return f"<!DOCTYPE html><html><head>{head}</head><body>{body}</body></html>"


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    site = tmp_path_factory.mktemp("site")
    stub = site.parent / "mathjax"
    (stub / "es5").mkdir(parents=True)
    (stub / "es5" / "tex-mml-chtml.js").write_text(STUB_MATHJAX)
    (site / "fig.svg").write_text(SVG)
    (site / "good.html").write_text(page(
        '<h1 id="top">Good</h1><img src="fig.svg"><a href="other.html#sec">x</a><a href="#top">x</a>'
        '<p><span class="math">\\(a+b\\)</span></p><pre>code with $$ and \\( is fine</pre>'))
    (site / "other.html").write_text(page('<h2 id="sec">Other</h2>', math=False))
    (site / "broken.html").write_text(page(
        '<img src="gone.png"><a href="nope.html">x</a><a href="other.html#missing">x</a>'
        '<a href="#nowhere">x</a><p><span class="math stub-ignore">\\(c\\)</span> and $$d$$</p>'
        '<p>With identical Hessians \\lambda_{\\max} = 1</p>'))
    (site / "index.html").write_text('<meta http-equiv="Refresh" content="0; url=good.html" />')
    shots = site.parent / "shots"
    found = check_site.check_site(site, shots, stub, math_timeout_s=5)
    blocked = check_site.check_site(site, shots, None, math_timeout_s=5, pages=[site / "good.html"])
    return {r.name: r for r in found} | {"good-blocked": blocked[0], "shots": shots}


def test_every_page_is_found_and_a_good_page_passes(reports):
    assert {"good.html", "other.html", "broken.html", "index.html"} <= set(reports)
    good = reports["good.html"]
    assert good.problems == []
    assert (good.images, good.internal_links, good.math_markup, good.math_rendered) == (1, 2, 1, 1)
    assert reports["index.html"].note == "redirect to good.html"
    assert (reports["shots"] / "good.png").stat().st_size > 0


def test_a_broken_page_has_each_fault_named(reports):
    problems = "\n".join(reports["broken.html"].problems)
    assert "missing image 'gone.png': file does not exist" in problems
    assert "broken link 'nope.html': nope.html does not exist" in problems
    assert "no element with id 'missing' in other.html" in problems
    assert "no element with id 'nowhere' in broken.html" in problems
    assert "math not rendered" in problems
    assert "raw TeX in the text: 'and $$d$$'" in problems
    assert "raw TeX in the text: 'With identical Hessians \\\\lambda_{\\\\max} = 1'" in problems


def test_math_without_mathjax_fails(reports):
    assert "MathJax did not load" in "\n".join(reports["good-blocked"].problems)
