"""Sphinx configuration of the docs site: ``python3 -m nox -s docs`` builds it into
docs/_build/html, with warnings and unresolved references as errors.

The pages are the Markdown files of this folder (read by MyST), the README as the home
page (index.md) and the CHANGELOG; the API reference (api/) is autodoc over the public
modules. Sphinx rather than MkDocs because the docstrings are reStructuredText
(``literal``, :class:`roles`) with Google-style sections (``Args:``, ``Returns:``,
``Raises:``): autodoc and napoleon read them as they are written, with working
cross-references. The hooks at the end adapt autodoc to the package's re-exports.
"""

from __future__ import annotations

import enum
import importlib
import inspect
import sys
from typing import Any

from sphinx.application import Sphinx
from sphinx.errors import PycodeError
from sphinx.ext.napoleon import GoogleDocstring
from sphinx.pycode import ModuleAnalyzer

import trio_hibernate

project = "trio-hibernate"
author = "the trio-hibernate authors"
copyright = "the trio-hibernate authors (MIT license)"  # noqa: A001 (Sphinx's name)
release = trio_hibernate.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

# Markdown: links to `page.md#a-heading` resolve (headings down to ###).
myst_heading_anchors = 3

# Docstrings: `single backticks` read as code, as in the Markdown pages.
default_role = "code"
# napoleon's settings; _google_docstring below runs its Google-style parser, not it.
napoleon_google_docstring = False
napoleon_numpy_docstring = False
napoleon_use_ivar = False
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_default_options = {"members": True, "show-inheritance": True}

# Every cross-reference must resolve, except to other projects (the build fetches no
# inventory: it needs nothing but PyPI) and to the private names that signatures show.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(builtins|collections|contextlib|datetime|enum|logging|os)(\..+)?"),
    (r"py:.*", r"(random|secrets|signal)(\..+)?"),
    (r"py:.*", r"(socket|sqlite3|ssl|types|typing|attrs|trio|trio_websocket|wsproto)(\..+)?"),
    (r"py:class", r"trio_hibernate(\.\w+)*\._\w+(\.\w+)*"),
    (r"py:class", r"Authorize|Fetch|Headers|StorageBackend"),
]

html_theme = "furo"
html_title = f"trio-hibernate {release}"


#: The documented modules; each re-exports names from private modules.
PUBLIC_MODULES = ("trio_hibernate", "trio_hibernate.client", "trio_hibernate.testing")


def _defining_module(public: str, name: str, value: Any) -> ModuleAnalyzer | None:
    """The analyzer of the private module whose source defines ``public.name``."""
    for modname, module in sorted(sys.modules.items()):
        if modname == public or not modname.startswith("trio_hibernate."):
            continue
        if getattr(module, name, None) is not value:
            continue
        try:
            analyzer = ModuleAnalyzer.for_module(modname)
            analyzer.analyze()
        except PycodeError:
            continue
        # tags: the classes and functions the source defines (tagorder lists imports too).
        defined_here = name in analyzer.find_tags() or ("", name) in analyzer.attr_docs
        if defined_here:
            return analyzer
    return None


def _adopt_attribute_docs(app: Sphinx) -> None:
    """Give each public module the attribute docs of the names it re-exports.

    The packages set ``__module__`` of every public name to the public module (so help()
    and reprs say ``trio_hibernate.Limits``), and autodoc looks for attribute docstrings
    (the string under an attrs field, a ``#:`` comment on a constant) in the source of
    ``__module__``: the ``__init__.py``, which has none. Copying them into that module's
    analyzer (which autodoc caches and reuses) puts the fields of ``Limits``,
    ``Request``, ``HostOptions``, ... and the constants on the site; nitpicky mode
    fails the build if a ``:attr:`` reference to one of them stops resolving.
    """
    del app
    for public in PUBLIC_MODULES:
        module = importlib.import_module(public)
        target = ModuleAnalyzer.for_module(public)
        target.analyze()
        for name in module.__all__:
            value = getattr(module, name)
            source = _defining_module(public, name, value)
            if source is None:
                continue
            namespace = name if inspect.isclass(value) else ""
            for (scope, attr), lines in source.attr_docs.items():
                if scope == namespace and (namespace or attr == name):
                    target.attr_docs.setdefault((scope, attr), lines)
            # Source order of a class's members (the module's own order is its __all__).
            for qualname, order in source.tagorder.items():
                if qualname.startswith(f"{name}."):
                    target.tagorder.setdefault(qualname, order)


def _google_docstring(
    app: Sphinx, what: str, name: str, obj: object, options: object, lines: list[str]
) -> None:
    """Napoleon's Google-style parsing, except that an attribute's, a property's or a
    constant's docstring is prose throughout: napoleon would read a first line such as
    "Bytes held for clients now: ..." as ``type: description``. The annotation gives
    the type."""
    kind = "" if what in {"attribute", "data", "property"} else what
    lines[:] = GoogleDocstring(lines, app.config, app, kind, name, obj, options).lines()


def _keep_enum_members(
    app: Sphinx, what: str, name: str, obj: object, skip: bool, options: object
) -> bool | None:
    """List an enum's members even without a docstring of their own (their class's
    docstring says what they mean); leave every other decision to autodoc."""
    del app, skip, options
    if what == "class" and not name.startswith("_") and isinstance(obj, enum.Enum):
        return False
    return None


def setup(app: Sphinx) -> None:
    app.connect("builder-inited", _adopt_attribute_docs)
    app.connect("autodoc-process-docstring", _google_docstring)
    app.connect("autodoc-skip-member", _keep_enum_members)
