"""The built documentation site, checked as a reader sees it.

Build the site first, with the README's command, then run the checks marked ``docs``::

    pip install -e ".[docs]" && sphinx-build -W -b html docs docs/_build/html
    python -m pytest -q -m docs tests/test_docs_site.py

The checks on the built site (marked ``docs``, outside the default run):

* every HTML page: each local image, script and stylesheet it loads exists, nothing is loaded
  from the network (the site works offline), every internal link and ``#anchor`` resolves, and
  no page shows a Sphinx error box (``system-message``, ``problematic``) or a notebook cell's
  traceback (unless the cell is tagged ``raises-exception``: an error shown on purpose);
* every public name of the documented modules has its API page, and the tutorial was executed
  and shows its figures;
* headless Chromium opens the home page, the tutorial and the ``fit`` API page from a local
  HTTP server (127.0.0.1), which records every request: none may miss (a missing image,
  script, font or MathJax component), MathJax must have rendered the pages' math, and the
  screenshots go to ``docs/screenshots/``;
* a copy of the site broken on purpose (an image deleted, a link and an anchor broken, an error
  box added) fails each check, so they can fail.

The same checks on small synthetic HTML trees run in the default suite, without a built site.
"""

from __future__ import annotations

import functools
import http.server
import importlib
import inspect
import re
import shutil
import subprocess
import threading
import types
import urllib.parse
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SITE = ROOT / "docs" / "_build" / "html"
SCREENSHOTS = ROOT / "docs" / "screenshots"
BUILD_COMMAND = 'pip install -e ".[docs]" && sphinx-build -W -b html docs docs/_build/html'
# the modules; every module in nflax.__all__ is added to them
API_MODULES = [
    "nflax",
    "nflax.bijections",
    "nflax.distributions",
    "nflax.flows",
    "nflax.datasets",
    "nflax.plotting",
    "nflax.parallel",
    "nflax.testing",
]
# the pages the browser opens (and screenshots): home, tutorial, the fit API page
BROWSER_PAGES = {
    "home": "index.html",
    "tutorial": "tutorial.html",
    "fit": "api/generated/nflax.fit.html",
}
ERROR_CLASSES = {"system-message", "problematic"}
EXTERNAL = ("http:", "https:", "mailto:", "ftp:", "data:", "javascript:", "tel:")


# ---- reading pages -----------------------------------------------------------------------


@dataclass
class Page:
    """What the checks need from one HTML page."""

    ids: set[str] = field(default_factory=set)
    links: list[str] = field(default_factory=list)  # <a href>
    resources: list[tuple[str, str]] = field(default_factory=list)  # (tag, url) it loads
    errors: list[str] = field(default_factory=list)  # error boxes, described
    math: bool = False  # has math for MathJax to render
    figures: int = 0  # images in notebook cell outputs


class _Parser(HTMLParser):
    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source"}
    VOID |= {"track", "wbr"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.page = Page()
        self.stack: list[tuple[str, set[str]]] = []  # open elements and their classes

    def _inside(self, cls: str) -> bool:
        return any(cls in classes for _, classes in self.stack)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        classes = set((a.get("class") or "").split())
        page = self.page
        for key in ("id", "name") if tag == "a" else ("id",):
            if a.get(key):
                page.ids.add(a[key])
        if tag == "a" and a.get("href") is not None:
            page.links.append(a["href"])
        if tag in ("img", "script", "iframe", "video", "audio", "source") and a.get("src"):
            page.resources.append((tag, a["src"]))
        if tag == "link" and "stylesheet" in (a.get("rel") or "").split() and a.get("href"):
            page.resources.append(("stylesheet", a["href"]))
        if tag == "img" and self._inside("cell_output"):
            page.figures += 1
        if classes & {"math", "mathjax_process"} or tag == "math":
            page.math = True
        for cls in sorted(classes & ERROR_CLASSES):
            page.errors.append(f'<{tag} class="{cls}">')
        if {"output", "traceback"} <= classes and not self._inside("tag_raises-exception"):
            page.errors.append("a notebook cell's traceback (an error while executing it)")
        if tag not in self.VOID:
            self.stack.append((tag, classes))

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in self.VOID:
            self.stack.pop()

    def handle_endtag(self, tag):
        for i in range(len(self.stack) - 1, -1, -1):  # tolerant of unclosed elements
            if self.stack[i][0] == tag:
                del self.stack[i:]
                break


@functools.cache
def read_page(path: Path) -> Page:
    parser = _Parser()
    parser.feed(path.read_text(encoding="utf-8", errors="replace"))
    return parser.page


def html_pages(site: Path) -> list[Path]:
    return sorted(p for p in site.rglob("*.html") if "_static" not in p.relative_to(site).parts)


def _target(site: Path, page: Path, url: str) -> tuple[Path | None, str]:
    """The file a local URL on ``page`` points to (None: the page itself) and its fragment."""
    parts = urllib.parse.urlsplit(url)
    path = urllib.parse.unquote(parts.path)
    if not path:
        return None, parts.fragment
    target = (site / path.lstrip("/")) if path.startswith("/") else (page.parent / path)
    if path.endswith("/"):
        target = target / "index.html"
    return target, parts.fragment


def _outside(site: Path, target: Path) -> bool:
    return not target.resolve().is_relative_to(site.resolve())


# ---- the checks: each returns a list of problems, one line each ---------------------------


def missing_resources(site: Path) -> list[str]:
    """Local images, scripts and stylesheets that do not exist; anything loaded remotely."""
    problems = []
    for page in html_pages(site):
        name = page.relative_to(site)
        for tag, url in read_page(page).resources:
            if url.startswith(("http:", "https:", "//")):
                problems.append(f"{name}: <{tag}> {url} is loaded from the network")
                continue
            if url.startswith(EXTERNAL):
                continue
            target, _ = _target(site, page, url)
            if target is None or _outside(site, target) or not target.is_file():
                problems.append(f"{name}: <{tag}> {url} does not exist")
    return problems


def broken_links(site: Path) -> list[str]:
    """Internal links whose file, or whose #anchor in that file, does not exist."""
    problems = []
    for page in html_pages(site):
        name = page.relative_to(site)
        for url in read_page(page).links:
            if url.startswith(EXTERNAL) or url.startswith("//") or url in ("", "#"):
                continue
            target, fragment = _target(site, page, url)
            target = page if target is None else target
            if _outside(site, target):
                problems.append(f"{name}: link {url} leaves the site")
            elif not target.exists():
                problems.append(f"{name}: link {url}: {target.relative_to(site)} does not exist")
            elif fragment and target.suffix == ".html":
                ids = read_page(target.resolve()).ids
                if urllib.parse.unquote(fragment) not in ids:
                    problems.append(f"{name}: link {url}: no #{fragment} in that page")
    return problems


def error_boxes(site: Path) -> list[str]:
    """Pages with a Sphinx or docutils error box, or a notebook cell's unexpected traceback."""
    return [
        f"{page.relative_to(site)}: {error}"
        for page in html_pages(site)
        for error in read_page(page).errors
    ]


def _fail_if(problems: list[str], what: str) -> None:
    if problems:
        shown = "\n  ".join(problems[:40])
        more = f"\n  … and {len(problems) - 40} more" if len(problems) > 40 else ""
        pytest.fail(f"{len(problems)} {what}:\n  {shown}{more}")


# ---- public names: the same rule as docs/conf.py, computed here on its own -----------------


def public_names(module: types.ModuleType) -> set[str]:
    """``__all__`` and every function and class the module defines, no leading underscore."""
    names = set(getattr(module, "__all__", ()))
    for name, obj in vars(module).items():
        defined_here = getattr(obj, "__module__", None) == module.__name__
        if (
            not name.startswith("_")
            and defined_here
            and (inspect.isclass(obj) or inspect.isfunction(obj))
        ):
            names.add(name)
    return names


def documented_modules() -> list[str]:
    import nflax

    extra = [f"nflax.{n}" for n in nflax.__all__ if isinstance(getattr(nflax, n), types.ModuleType)]
    return sorted(set(API_MODULES) | set(extra))


def pages_missing(site: Path) -> list[str]:
    missing = []
    for modname in documented_modules():
        module = importlib.import_module(modname)
        wanted = [modname]
        for name in public_names(module):
            obj = getattr(module, name)
            wanted.append(
                obj.__name__ if isinstance(obj, types.ModuleType) else f"{modname}.{name}"
            )
        for full in wanted:
            if not (site / "api" / "generated" / f"{full}.html").is_file():
                missing.append(f"{full}: no api/generated/{full}.html")
    return missing


# ---- the browser --------------------------------------------------------------------------


class _Server:
    """A static file server on 127.0.0.1 that records every request and its status."""

    def __init__(self, root: Path):
        self.requests: list[tuple[str, int]] = []
        log = self.requests

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(root), **kwargs)

            def log_request(self, code="-", size="-"):
                log.append((urllib.parse.unquote(self.path.split("?")[0]), int(code)))

            def log_message(self, *args):  # quiet
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    def failed(self) -> list[str]:
        # Chromium asks for /favicon.ico on its own; the site has none to offer
        return [f"{p} → {code}" for p, code in self.requests if code >= 400 and p != "/favicon.ico"]


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail("no chromium on PATH: install Debian's package (apt-get install chromium)")
    return exe


def run_chromium(url: str, profile: Path, *, screenshot: Path | None = None) -> str:
    """Load ``url`` headless (MathJax given time to typeset); return the DOM after its scripts
    ran, or write a 1280×2000 screenshot."""
    args = [
        chromium(),
        "--headless",
        "--no-sandbox",  # CI runs as root
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        "--window-size=1280,2000",
        "--virtual-time-budget=20000",
    ]
    args += [f"--screenshot={screenshot}"] if screenshot else ["--dump-dom"]
    out = subprocess.run(args + [url], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        pytest.fail(f"chromium failed on {url} (exit {out.returncode}):\n{out.stderr[-2000:]}")
    return out.stdout


def browse(site: Path, pages: dict[str, str], profile: Path, shots: Path | None) -> tuple:
    """Open each page in Chromium from a local server: the DOM of each, the failed requests."""
    doms = {}
    with _Server(site) as server:
        for label, page in pages.items():
            doms[label] = run_chromium(server.url + page, profile)
            if shots is not None:
                run_chromium(server.url + page, profile, screenshot=shots / f"{label}.png")
        return doms, server.failed()


def math_problems(site: Path, pages: dict[str, str], doms: dict[str, str]) -> list[str]:
    problems = []
    for label, page in pages.items():
        dom = doms[label]
        if "<mjx-merror" in dom:  # the element (its CSS rule is on every page)
            problems.append(f"{page}: MathJax reports an error in a formula")
        if read_page(site / page).math and "<mjx-container" not in dom:
            problems.append(f"{page}: has math, but MathJax rendered none of it")
    return problems


# ---- on the built site (docs marker) ------------------------------------------------------


@pytest.fixture(scope="module")
def site() -> Path:
    if not (SITE / "index.html").is_file():
        pytest.fail(f"the site is not built ({SITE} has no index.html): run `{BUILD_COMMAND}`")
    return SITE


@pytest.mark.docs
def test_every_local_image_script_and_stylesheet_exists_and_nothing_is_remote(site):
    _fail_if(missing_resources(site), "missing or remote resources")


@pytest.mark.docs
def test_every_internal_link_and_anchor_resolves(site):
    _fail_if(broken_links(site), "broken internal links")


@pytest.mark.docs
def test_no_page_shows_an_error_box(site):
    _fail_if(error_boxes(site), "error boxes")


@pytest.mark.docs
def test_every_public_name_has_an_api_page(site):
    _fail_if(pages_missing(site), "public names without an API page")


@pytest.mark.docs
def test_the_tutorial_was_executed_and_shows_its_figures(site):
    page = read_page(site / "tutorial.html")
    assert page.figures >= 1, "tutorial.html has no figure in a cell output: was it executed?"


@pytest.mark.docs
def test_chromium_shows_the_pages_with_every_resource_and_the_math(site, tmp_path):
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    doms, failed = browse(site, BROWSER_PAGES, tmp_path / "profile", SCREENSHOTS)
    _fail_if(failed, "requests the browser made that failed")
    _fail_if(math_problems(site, BROWSER_PAGES, doms), "pages whose math did not render")
    for label in BROWSER_PAGES:
        shot = SCREENSHOTS / f"{label}.png"
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", shot
        assert shot.stat().st_size > 20_000, f"{shot}: {shot.stat().st_size} bytes, a blank page?"
    assert "nflax.fit" in doms["fit"] and "furo" in doms["home"]  # the theme's markup is there


@pytest.mark.docs
def test_a_site_broken_on_purpose_fails_every_check(site, tmp_path):
    broken = tmp_path / "html"
    shutil.copytree(site, broken, ignore=shutil.ignore_patterns("mathjax"))
    read_page.cache_clear()
    # an image of the tutorial deleted
    tutorial = broken / "tutorial.html"
    image = next(url for tag, url in read_page(tutorial).resources if tag == "img")
    (broken / image).unlink()
    # a link to a page that is not there, an anchor that is not there, an error box
    home = broken / "index.html"
    text = home.read_text()
    text = text.replace('href="tutorial.html"', 'href="tutorial_gone.html"')
    text = text.replace('href="#in-python"', 'href="#in-rust"')
    text = text.replace("</article>", '<div class="system-message">ERROR/3</div></article>', 1)
    home.write_text(text)
    read_page.cache_clear()
    assert any(image in p for p in missing_resources(broken))
    links = broken_links(broken)
    assert any("tutorial_gone.html" in p for p in links) and any("#in-rust" in p for p in links)
    assert error_boxes(broken) == ['index.html: <div class="system-message">']
    # and the browser misses the image too
    _, failed = browse(broken, {"tutorial": "tutorial.html"}, tmp_path / "profile", None)
    assert any(Path(image).name in f and "404" in f for f in failed), failed
    read_page.cache_clear()


# ---- the checks themselves, on synthetic trees (default suite) ----------------------------


def _tree(tmp_path: Path, pages: dict[str, str], files: tuple[str, ...] = ()) -> Path:
    for name, body in pages.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"<html><head></head><body>{body}</body></html>")
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"\x89PNG")
    read_page.cache_clear()
    return tmp_path


GOOD = {
    "index.html": '<h1 id="top">x</h1><a href="#top">t</a><a href="sub/a.html#s">a</a>'
    '<img src="_images/fig.png"><a href="https://example.org">ext</a><a href="#">up</a>'
    '<script src="_static/s.js?v=1"></script>',
    "sub/a.html": '<section id="s"><a href="../index.html">home</a><a href="./">dir</a></section>'
    '<img src="../_images/fig.png">',
    "sub/index.html": '<a name="old"></a><a href="a.html">a</a>',
}
GOOD_FILES = ("_images/fig.png", "_static/s.js")


def test_checks_pass_on_a_good_tree(tmp_path):
    site = _tree(tmp_path, GOOD, GOOD_FILES)
    assert missing_resources(site) == []
    assert broken_links(site) == []
    assert error_boxes(site) == []


def test_a_missing_image_and_a_remote_script_are_found(tmp_path):
    pages = dict(GOOD)
    pages["sub/a.html"] += '<img src="../_images/gone.png">'
    pages["index.html"] += '<script src="https://cdn.example.org/mathjax.js"></script>'
    site = _tree(tmp_path, pages, GOOD_FILES)
    assert missing_resources(site) == [
        "index.html: <script> https://cdn.example.org/mathjax.js is loaded from the network",
        "sub/a.html: <img> ../_images/gone.png does not exist",
    ]


def test_broken_links_anchors_and_escapes_are_found(tmp_path):
    pages = dict(GOOD)
    pages["sub/index.html"] += (
        '<a href="b.html">b</a><a href="a.html#nowhere">n</a><a href="#old">ok</a>'
        '<a href="../../outside.html">o</a>'
    )
    site = _tree(tmp_path, pages, GOOD_FILES)
    assert broken_links(site) == [
        "sub/index.html: link b.html: sub/b.html does not exist",
        "sub/index.html: link a.html#nowhere: no #nowhere in that page",
        "sub/index.html: link ../../outside.html leaves the site",
    ]


def test_error_boxes_and_unexpected_tracebacks_are_found(tmp_path):
    traceback = '<div class="cell_output"><div class="output traceback">Error</div></div>'
    pages = {
        "index.html": '<div class="system-message"><p>ERROR/3</p></div>',
        "a.html": '<a class="reference problematic" href="#id1">:func:`nope`</a>',
        "b.html": f'<div class="cell docutils container">{traceback}</div>',
        # an error shown on purpose (the cell tagged raises-exception) is not a problem
        "c.html": f'<div class="cell tag_raises-exception container">{traceback}</div>',
    }
    site = _tree(tmp_path, pages)
    assert error_boxes(site) == [
        'a.html: <a class="problematic">',
        "b.html: a notebook cell's traceback (an error while executing it)",
        'index.html: <div class="system-message">',
    ]


def test_the_readme_and_ci_build_the_docs_with_the_same_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert BUILD_COMMAND in readme, "README.md has lost the docs build command"
    assert re.search(rf"^{re.escape(BUILD_COMMAND)}$", ci, re.M), ".ci/run does not run it verbatim"
    assert "python -m pytest -q -m docs tests/test_docs_site.py" in ci
    assert "docs/_build/html/index.html" in readme  # the link to the built site
