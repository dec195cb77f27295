"""What ``detkd methods`` prints: the registered methods and their options, read from the code.

Everything comes from the registry and from each method's ``Options`` dataclass, the same classes that
:func:`detkd.distill.base.build_distiller` validates configs against, so the listing cannot drift from what
a config accepts. An option's help is the comment written after its field (with the comment lines right
below it when it continues), read with :mod:`ast` and :mod:`tokenize` from the dataclass's source.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import re
import sys
import textwrap
import tokenize
import types
import typing
from typing import Any

from detkd.distill import REGISTRY
from detkd.distill.base import DEFAULT_RANGE, Distiller, is_numeric, option_range
from detkd.distill.recommended import as_config, best_options, recommendations


def registry() -> dict[str, type[Distiller]]:
    """Every built-in method, by registry name (sorted)."""
    return dict(sorted(REGISTRY.items()))


def _plain(text: str) -> str:
    """Docstring markup to plain text: ``code`` -> code, :mod:`x` -> x, whitespace collapsed."""
    text = re.sub(r":\w+:`~?([^`]*)`", r"\1", text)
    return " ".join(text.replace("``", "").split())


def first_sentence(doc: str | None) -> str:
    """The first sentence of a docstring's first paragraph (a sentence ends with '.' before a capital letter
    or the end of the paragraph), as plain text on one line."""
    if not doc:
        return ""
    paragraph = _plain(inspect.cleandoc(doc).split("\n\n")[0])
    return re.split(r"(?<=[.!?])\s+(?=[A-Z(])", paragraph, maxsplit=1)[0]


def _short_citation(match: re.Match) -> str:
    """``(Cao et al., "Title", NeurIPS 2022, https://...)`` -> ``(Cao et al., NeurIPS 2022)``."""
    inner = match.group(1)
    author = re.search(r"[\w-]+ et al\.", inner)
    rest = re.sub(r'"[^"]*"|https?://\S+', "", inner)  # titles and links hold no venue
    venue = re.findall(r"\b(?:[A-Z][A-Za-z]* )?(?:19|20)\d\d\b", rest)
    if not author:
        return match.group(0)
    return f"({author.group(0)}" + (f", {venue[-1]})" if venue else ")")


def summary(cls: type[Distiller]) -> str:
    """One line on what a method distils: the first sentence of its module's docstring (citation shortened
    to author and venue), or of its class's docstring when the module registers several methods and the
    class's docstring does not defer to the module's."""
    module = sys.modules[cls.__module__]
    siblings = [c for c in REGISTRY.values() if c.__module__ == cls.__module__]
    own = cls.__doc__ or ""
    if module.__doc__ and (len(siblings) == 1 or "module docstring" in own or not own):
        text = first_sentence(module.__doc__)
    else:
        text = first_sentence(own)
    return re.sub(r"\(([^()]*et al\.[^()]*)\)", _short_citation, text)


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3].rsplit(" ", 1)[0] + " ..."


def _class_comments(cls: type) -> dict[str, str]:
    """The field comments written in one class's own source (see :func:`option_comments`)."""
    source = textwrap.dedent(inspect.getsource(cls))
    classdef = ast.parse(source).body[0]
    trailing: dict[int, str] = {}  # line -> comment after code
    standalone: dict[int, str] = {}  # line -> comment alone on its line
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            own_line = tok.line[: tok.start[1]].strip() == ""
            (standalone if own_line else trailing)[tok.start[0]] = tok.string.lstrip("#").strip()
    fields = [node for node in getattr(classdef, "body", [])
              if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)]
    parts: dict[str, list[str]] = {}
    for node in fields:
        last = node.end_lineno or node.lineno
        parts[node.target.id] = [trailing[i] for i in range(node.lineno, last + 1) if i in trailing]
    for i, node in enumerate(fields):
        line = (node.end_lineno or node.lineno) + 1
        block = []
        while line in standalone:
            block.append(standalone[line])
            line += 1
        if not block:
            continue
        nxt = fields[i + 1] if i + 1 < len(fields) else None
        if nxt is not None and nxt.lineno == line and not parts[nxt.target.id]:
            parts[nxt.target.id] = block  # a comment block right above a field without its own comment
        elif parts[node.target.id]:
            parts[node.target.id] += block  # the continuation of this field's comment
    return {name: " ".join(texts) for name, texts in parts.items() if texts}


def option_comments(options_cls: type) -> dict[str, str]:
    """``{field: help}`` read from the source of a dataclass and of the dataclasses it inherits from: the
    comment after each field, joined with the full-line comments right below it (its continuation); for a
    field without such a comment, the full-line comments right above it. Fields without any are absent."""
    out: dict[str, str] = {}
    for cls in reversed(options_cls.__mro__):  # base classes first, so a subclass's comment wins
        if dataclasses.is_dataclass(cls):
            out.update(_class_comments(cls))
    return out


def type_name(tp: Any, quoted: bool = False) -> str:
    """A readable type: ``float``, ``list[int]``, ``float or None``, ``one of auto, conv1x1`` (``quoted``:
    ``one of ["auto", "conv1x1"]``, as YAML would write the choices)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return "one of [" + ", ".join(f'"{a}"' for a in args) + "]" if quoted else \
            "one of " + ", ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("None" if a is type(None) else type_name(a, quoted) for a in args)
    if origin is not None:
        return f"{origin.__name__}[{', '.join(type_name(a, quoted) for a in args)}]"
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def default_value(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def allowed_values(f: dataclasses.Field, tp: Any) -> str:
    """What a numeric option must be, in the words of the range check (``must be in (0, 1]``; a list's
    elements: ``each must be >= 0``), from the range its field declares; "" for any number or no number."""
    if not is_numeric(tp):
        return ""
    rng = option_range(f) or DEFAULT_RANGE
    if not rng.bounded:
        return ""
    return ("each " if typing.get_origin(tp) in (list, tuple) else "") + f"must be {rng}"


def options_table(cls: type[Distiller]) -> list[tuple[str, str, Any, str, str]]:
    """``(name, type, default, allowed values, help)`` for every option of a method, in the dataclass's order
    (allowed values: :func:`allowed_values`)."""
    opts = cls.Options
    hints = typing.get_type_hints(opts)
    helps = option_comments(opts)
    return [(f.name, type_name(hints[f.name]), default_value(f), allowed_values(f, hints[f.name]),
             helps.get(f.name, "")) for f in dataclasses.fields(opts)]


def format_methods() -> str:
    """``detkd methods``: one line per registered method."""
    methods = registry()
    marked = {r.method for r in recommendations()}
    width = max(len(n) for n in methods) + 2
    lines = [f"{'name':<{width}}  {'detectors':<28}  what it distils"]
    for name, cls in methods.items():
        shown = f"{name} *" if name in marked else name
        lines.append(f"{shown:<{width}}  {', '.join(cls.archs):<28}  {_clip(summary(cls), 100)}")
    lines.append("")
    if marked:
        lines.append("* recommended (detkd's converged benches, benchmarks/RESULTS.md \"Converged\"):")
        for r in recommendations():
            lines.append(f"    {', '.join(r.archs)}: {as_config(r)}")
    else:
        lines.append("No method is recommended yet: no converged bench has a gain whose interval excludes zero.")
    lines.append("`detkd methods NAME` lists a method's options; in a config they go in its "
                 "distill.methods entry (docs/methods.md).")
    return "\n".join(lines)


def format_method(name: str) -> str:
    """``detkd methods NAME``: what the method distils, its detectors and its options with defaults, allowed
    values and help.
    Raises ``KeyError`` for an unknown name."""
    methods = registry()
    if name not in methods:
        raise KeyError(name)
    cls = methods[name]
    lines = [f"{name}: {summary(cls)}", f"detectors: {', '.join(cls.archs)}"]
    for label, recs in (("recommended", recommendations(name)), ("best options found", best_options(name))):
        for r in recs:
            lines.append(f"{label} for {', '.join(r.archs)}: {as_config(r)}")
            lines.extend("    " + line for line in textwrap.wrap(r.evidence, 100))
    lines += ["", "options (default, allowed values, help):"]
    rows = options_table(cls)
    if not rows:
        lines.append("  (none)")
    for opt, tp, default, allowed, help_text in rows:
        lines.append(f"  {opt}: {tp} = {default!r}" + (f", {allowed}" if allowed else ""))
        if help_text:
            lines.extend("      " + line for line in textwrap.wrap(help_text, 100))
    lines.append("")
    lines.append(f"example: methods: [{{name: {name}, weight: 1.0, options: {{...}}}}]  (weight: the run-level "
                 "multiplier; an option named weight must go under options)")
    return "\n".join(lines)
