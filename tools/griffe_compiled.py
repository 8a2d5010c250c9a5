"""A griffe extension: document fastbus's compiled modules from their stubs *and* docstrings.

fastbus's compiled modules (``_ring``, ``_partition``, ``_walcodec``, ``_dispatch``) ship a
``.pyi`` stub beside the ``.so``. griffe finds both under one module name: it inspects the
extension (importing it: docstrings, every member, untyped signatures), visits the stub
(typed signatures, no docstrings), and merges the stub's annotations into the inspected
module. Two things get in the way, and this extension fixes both:

1. griffe imports with ``sys.path`` restricted to its search paths, so importing
   ``fastbus`` fails there (numpy and cysignals are not on them) and griffe silently
   falls back to the stub alone: no docstrings at all. Importing ``fastbus`` here, before
   griffe loads anything, puts the modules in ``sys.modules``, so the inspection succeeds.
2. Cython's ``embedsignature`` puts ``Class.method(self, arg)`` lines at the top of every
   docstring, and a ``cdef public`` attribute's docstring is only ``name: type``. Those are
   removed after loading (the typed signature is rendered from the stub anyway), and so
   is griffe's "method descriptor" label on compiled functions.

The docstrings of the whole package are written in reST habits that Markdown shows
verbatim; two are translated for the site (the source is unchanged): Sphinx roles
(``:class:`~fastbus.Retention``` becomes ``Retention`` in code style) and a paragraph
ending in ``::`` before a literal block (it ends in ``:``; the indented block after it is
already a Markdown code block).

If a compiled module still ends up documented from its stub alone (the extensions are not
built, or do not import), the build fails with a message that says so.

Used by mkdocs.yml (``plugins: mkdocstrings: handlers: python: options: extensions``).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterator
from typing import Any

import griffe

# A line Cython's embedsignature put first: ``name(args)``, ``Cls.name(self, args)``,
# optionally ``-> type``. Some docstrings repeat it by hand, so every leading one goes.
_SIGNATURE_LINE = re.compile(r"^[A-Za-z_][\w.]*\(.*\)(\s*->\s*\S.*)?$")
# Cython's doc for a ``cdef public`` attribute: just ``name: type``.
_ATTRIBUTE_ONLY = re.compile(r"^[A-Za-z_]\w*: [\w'\"\[\], |.]+$")
# What a compiled class's inherited ``__init__``/``__new__`` says: nothing of ours.
_SLOT_WRAPPER = re.compile(r"^(Initialize self|Create and return a new object)\.")
_ROLE = re.compile(r":(?:class|meth|func|attr|exc|mod|data|obj):`(~?)([^`]+)`")
_LITERAL_INTRO = re.compile(r"::$", re.MULTILINE)
COMPILED_MODULES = ("fastbus._dispatch", "fastbus._partition", "fastbus._ring",
                    "fastbus._walcodec")


def markdown_docstring(text: str) -> str:
    """``text`` with Sphinx roles as inline code and ``::`` literal intros as ``:``."""
    text = _ROLE.sub(lambda m: f"``{m.group(2).rsplit('.', 1)[-1] if m.group(1) else m.group(2)}``",
                     text)
    return _LITERAL_INTRO.sub(":", text)


def clean_docstring(doc: str | None) -> str | None:
    """``doc`` without Cython's embedded signature lines; None when nothing is left."""
    if not doc:
        return None
    lines = inspect.cleandoc(doc).splitlines()
    while lines and (not lines[0].strip() or _SIGNATURE_LINE.match(lines[0].strip())):
        lines.pop(0)
    text = "\n".join(lines).strip()
    if not text or _ATTRIBUTE_ONLY.match(text) or _SLOT_WRAPPER.match(text):
        return None
    return text


class CompiledStubDocstrings(griffe.Extension):
    """See the module docstring."""

    def __init__(self) -> None:
        super().__init__()
        import fastbus  # noqa: F401  (see point 1 above; raises if the build is missing)

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader,
                   **kwargs: Any) -> None:
        if pkg.name != "fastbus":
            return
        for obj in _walk(pkg):
            if obj.docstring is not None:
                self._set(obj, markdown_docstring(obj.docstring.value), loader)
        for path in COMPILED_MODULES:
            module = pkg.modules_collection.get_member(path)
            if str(module.filepath).endswith(".pyi"):
                raise RuntimeError(
                    f"griffe could not import the compiled module {path}, so the API "
                    f"reference would have no docstrings for it; build the extensions "
                    f"first (`make build`) and check that `python -c 'import {path}'` works")
            for obj in _walk(module):
                obj.labels.discard("method descriptor")
                if obj.docstring is not None:
                    self._set(obj, clean_docstring(obj.docstring.value), loader)

    @staticmethod
    def _set(obj: griffe.Object, text: str | None, loader: griffe.GriffeLoader) -> None:
        obj.docstring = None if text is None else griffe.Docstring(
            text, parent=obj, parser=loader.docstring_parser,
            parser_options=loader.docstring_options)


def _walk(obj: griffe.Object) -> Iterator[griffe.Object]:
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _walk(member)  # type: ignore[arg-type]
