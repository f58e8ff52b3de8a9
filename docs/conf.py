"""Sphinx configuration of nflax's documentation site.

Build it (from the repository root; the README has the same command)::

    pip install -e ".[docs]" && sphinx-build -W -b html docs docs/_build/html

Warnings are errors, and the build needs no network:

* no intersphinx (it would download inventories);
* MathJax is served from the site itself: the ``sphinx-mathjax-offline`` package (a pip
  dependency of the ``docs`` extra) ships MathJax 3.2.2 and copies it to
  ``_static/mathjax/`` after a successful build; ``mathjax_path`` points there, not at a CDN
  (Sphinx's default). ``tests/test_docs_site.py`` checks that no page loads a remote script;
* notebooks (the tutorial) run locally with myst-nb, cached under ``docs/_build/.jupyter_cache``
  so an unchanged notebook is not executed again (the cache knows the notebook's code, not
  nflax's: after a change to the library, delete ``docs/_build`` to see its effect there).

The API reference is generated at every build (``write_api_pages`` below) from the public
names of each module: its ``__all__`` and the functions and classes it defines, so a new
public name gets its page without anyone editing the docs, and a removed one loses it.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
import types
import warnings
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent

# Document (and run the tutorial against) this checkout's nflax, even when another copy is
# installed: autodoc imports from sys.path, the notebook kernel inherits PYTHONPATH.
sys.path.insert(0, str(ROOT / "src"))
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]
)
# sphinx-autodoc-typehints 3.6 calls an API that Sphinx 10 will remove: a Python warning (not
# a Sphinx one, so -W ignores it) printed once per docstring; keep the log readable.
warnings.filterwarnings("ignore", message=".*set_application.*is deprecated")

import matplotlib  # noqa: E402
from docutils import nodes  # noqa: E402
from sphinx.transforms import SphinxTransform  # noqa: E402

import nflax  # noqa: E402
import nflax.cli  # noqa: E402, F401  (before the next lines: it sets MPLBACKEND=Agg on import)

# Matplotlib in the build process (autodoc imports nflax.plotting) never opens a window. The
# notebook kernel inherits this process's environment, and with MPLBACKEND set (by nflax.cli,
# or by the caller) it would not use the inline backend: the notebooks would show no figures.
matplotlib.use("Agg")
os.environ.pop("MPLBACKEND", None)

project = "nflax"
author = "the nflax authors"
copyright = "the nflax authors"  # noqa: A001  (Sphinx's name)
release = version = nflax.__version__

extensions = [
    "myst_nb",  # MyST Markdown and executed notebooks (do not also list myst_parser)
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "sphinx_autodoc_typehints",  # after napoleon
    "sphinxarg.ext",  # the CLI page, generated from nflax.cli.build_parser
    "sphinx_copybutton",
    "sphinx_design",  # dropdowns (the gallery's sources)
    "sphinx-mathjax-offline",  # MathJax 3 copied into the site: math renders with no network
]

exclude_patterns = ["_build", "screenshots", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints"]

# ---- HTML --------------------------------------------------------------------------------
html_theme = "furo"
html_title = f"nflax {release}"

# ---- math: offline MathJax -----------------------------------------------------------------
# The extension sets this too; said here so that nobody has to look it up. The path is
# relative to _static/, where the extension copies MathJax 3.2.2 at the end of the build.
mathjax_path = "mathjax/tex-chtml.js"

# ---- MyST and notebooks --------------------------------------------------------------------
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3
# where a Markdown link [text](target) that is not a file is looked up: sphinx-argparse's
# domain cannot answer such a query (each one would be a warning, so an error here)
myst_ref_domains = ["std", "py", "math"]
nb_execution_mode = "cache"
nb_execution_cache_path = str(DOCS / "_build" / ".jupyter_cache")
nb_execution_timeout = 900  # seconds per cell; the whole build stays under 10 minutes
nb_execution_raise_on_error = True
nb_execution_show_tb = True
# A cell tagged raises-exception shows its traceback; nflax's messages use "→", which the
# IPython traceback lexer cannot highlight: such a block is shown as plain text, not warned of.
suppress_warnings = ["misc.highlighting_failure"]
nb_merge_streams = True

# ---- autodoc -------------------------------------------------------------------------------
autodoc_default_options = {"member-order": "bysource"}
autodoc_member_order = "bysource"
autodoc_class_signature = "separated"
autoclass_content = "class"
autosummary_generate = False  # the pages are written by write_api_pages, below
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
typehints_use_rtype = False
typehints_defaults = "comma"
always_use_bars_union = True

# ---- the API reference ---------------------------------------------------------------------
# One page per module, and one per public name of it. The modules the issue asks for first,
# then the other public modules of nflax.__all__ and those the README points users to.
API_MODULES = [
    "nflax",
    "nflax.bijections",
    "nflax.distributions",
    "nflax.flows",
    "nflax.datasets",
    "nflax.plotting",
    "nflax.parallel",
    "nflax.testing",
    "nflax.training",
    "nflax.vi",
    "nflax.flow_matching",
    "nflax.dequantization",
    "nflax.metrics",
    "nflax.checkpoint",
    "nflax.engine",
    "nflax.nets",
    "nflax.vector_fields",
    "nflax.variables",
    "nflax.datafiles",
    "nflax.image_data",
    "nflax.runs",
]
API_DIR = DOCS / "api" / "generated"


def public_names(module: types.ModuleType) -> list[str]:
    """The module's ``__all__`` and every function and class it defines (no leading ``_``).

    ``tests/test_docs_site.py`` computes the same set on its own and checks that each name
    has a page.
    """
    names = set(getattr(module, "__all__", ()))
    for name, obj in vars(module).items():
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(obj) or inspect.isfunction(obj):
            names.add(name)
    return sorted(names, key=lambda n: (n.lower(), n))


def _kind(obj) -> str:
    if isinstance(obj, types.ModuleType):
        return "module"
    if inspect.isclass(obj):
        return "exception" if issubclass(obj, BaseException) else "class"
    if callable(obj):
        return "function"
    return "data"


def _title(text: str) -> str:
    return f"{text}\n{'=' * len(text)}\n"


_SECTIONS = [
    ("class", "Classes"),
    ("function", "Functions"),
    ("exception", "Exceptions"),
    ("data", "Constants"),
]


def _module_page(modname: str, documented: set[str]) -> tuple[str, dict[str, str]]:
    """The module's page (its docstring, then tables of its names) and one page per name."""
    module = importlib.import_module(modname)
    by_kind: dict[str, list[str]] = {}
    pages = {}
    for name in public_names(module):
        obj = getattr(module, name)
        kind = _kind(obj)
        by_kind.setdefault(kind, []).append(name)
        if kind != "module":
            pages[f"{modname}.{name}"] = _object_page(modname, name, obj, kind)
    lines = [_title(modname), f".. automodule:: {modname}\n   :no-members:\n"]
    lines.append(f".. currentmodule:: {modname}\n")
    submodules = by_kind.get("module", [])
    if submodules:
        lines.append("Modules\n-------\n")
        for name in submodules:
            full = getattr(module, name).__name__
            target = f":doc:`{full}`" if full in documented else f"``{full}``"
            lines.append(f"* {target}")
        lines.append("")
    for kind, heading in _SECTIONS:
        if kind not in by_kind:
            continue
        lines.append(f"{heading}\n{'-' * len(heading)}\n")
        lines.append(".. autosummary::\n   :toctree: .\n   :nosignatures:\n")
        lines.extend(f"   {name}" for name in by_kind[kind])
        lines.append("")
    return "\n".join(lines), pages


def _object_page(modname: str, name: str, obj, kind: str) -> str:
    # "Bases: ..." unless the only base is object
    bases = "   :show-inheritance:\n" if getattr(obj, "__bases__", (object,)) != (object,) else ""
    directive = {
        # inherited members down to (not including) Flax's nnx.Module and nnx.Variable: a
        # bijection's page shows forward/inverse/trajectory from Bijection, not Flax's methods
        "class": f".. autoclass:: {name}\n   :members:\n   :inherited-members: Module, Variable\n"
        f"   :exclude-members: __new__\n{bases}",
        "exception": f".. autoexception:: {name}\n{bases}",
        "function": f".. autofunction:: {name}\n",
        "data": f".. autodata:: {name}\n",
    }[kind]
    return f"{_title(f'{modname}.{name}')}\n.. currentmodule:: {modname}\n\n{directive}"


def write_api_pages() -> None:
    """Write ``docs/api/generated/*.rst``; unchanged files are not touched (incremental builds
    stay incremental) and pages of names that are no longer public are removed."""
    API_DIR.mkdir(parents=True, exist_ok=True)
    documented = set(API_MODULES)
    wanted: dict[str, str] = {}
    for modname in API_MODULES:
        page, pages = _module_page(modname, documented)
        wanted[modname] = page
        wanted.update(pages)
    for stale in API_DIR.glob("*.rst"):
        if stale.stem not in wanted:
            stale.unlink()
    for name, text in wanted.items():
        path = API_DIR / f"{name}.rst"
        if not path.exists() or path.read_text() != text:
            path.write_text(text)


write_api_pages()


# ---- docstrings: the direction formulas ------------------------------------------------------
# Bijection docstrings state their math as two lines, aligned for reading in the source:
#
#     forward (data → latent):   ``z = …``,   ``log|det J| = …``
#     inverse (latent → data):   ``x = …``,   ``log|det J⁻¹| = …``
#
# possibly with indented continuation lines. As reStructuredText the two lines would run into
# one paragraph (or be an error, with the continuations); here each becomes an item of a list.
_DIRECTION = re.compile(r"^(\s*)(forward|inverse)((?: \([^)]*\))?):\s+(\S.*)$")


def direction_lists(app, what, name, obj, options, lines: list[str]) -> None:
    out: list[str] = []
    i = 0
    while i < len(lines):
        match = _DIRECTION.match(lines[i])
        if not match:
            out.append(lines[i])
            i += 1
            continue
        if out and out[-1].strip():
            out.append("")
        while match:
            indent, word, where, text = match.groups()
            parts = [text]
            i += 1
            while i < len(lines) and lines[i].strip() and not _DIRECTION.match(lines[i]):
                parts.append(lines[i].strip())
                i += 1
            body = re.sub(r"\s{2,}", " ", " ".join(parts))
            out.append(f"{indent}* **{word}**{where}: {body}")
            match = _DIRECTION.match(lines[i]) if i < len(lines) else None
        out.append("")
    lines[:] = out


# ---- the CLI page: flags in help texts as code ----------------------------------------------
class FlagsAsCode(SphinxTransform):
    """On the CLI page, a ``--flag`` named in a help text becomes code, as on the rest of the
    site; left as text, smart quotes would turn its ``--`` into a dash (they run next)."""

    default_priority = 700  # before SphinxSmartQuotes (750)
    FLAG = re.compile(r"(?<![\w-])(--[A-Za-z][\w-]*)")

    def apply(self, **kwargs) -> None:
        if self.env.docname != "cli":
            return
        for text in list(self.document.findall(nodes.Text)):
            parent = text.parent
            if parent is None or isinstance(parent, nodes.FixedTextElement | nodes.literal):
                continue
            pieces = self.FLAG.split(str(text))
            if len(pieces) == 1:
                continue
            new = [nodes.literal(p, p) if i % 2 else nodes.Text(p) for i, p in enumerate(pieces)]
            parent.replace(text, [n for n in new if n.astext()])


def setup(app):
    # after napoleon (priority 500), which has turned Google-style sections into fields
    app.connect("autodoc-process-docstring", direction_lists, priority=600)
    app.add_transform(FlagsAsCode)
