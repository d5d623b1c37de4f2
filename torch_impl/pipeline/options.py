"""Command-line options generated from configuration dataclasses: a setting is written once.

Every field of the dataclass (and of a nested dataclass field, e.g. ``TrainConfig.model``)
becomes an option:

    field name                  --field-name (or a rename, e.g. data_dir -> --data)
    int, float, str             type=int, float, str
    bool                        --field-name / --no-field-name
    X | None                    type X; the word "none" gives None (e.g. --pool none)
    list[X], tuple[X, ...]      nargs="*", "+" (tuple[X, X]: exactly 2 values)
    Literal["a", "b"]           choices (also from a table: {"sampler": ("balanced", "shuffle")})
    trailing "# comment"        the help, followed by the field's default
    "# --- title ---" line      the option group of the fields below it

The parser's defaults are ``argparse.SUPPRESS``: an option that is not given leaves no trace
in the namespace, so :func:`apply_options` changes exactly the settings given on the command
line and a configuration file's values survive.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import io
import re
import textwrap
import tokenize
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal

__all__ = ["field_docs", "field_paths", "add_dataclass_options", "given_options", "apply_options"]

_SECTION = re.compile(r"^#\s*-{2,}\s*(.*?)\s*-{2,}\s*$")


@functools.lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, tuple[str | None, str]]:
    """{field name: (section title or None, trailing comment)} read from the class's source.

    The comment is the one at the end of the field's (last) line, without the ``#``; the
    section is the nearest ``# --- title ---`` line above the field. Fields without a comment
    are missing from the result (and so are all fields when the source cannot be read).
    """
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    comments: dict[int, str] = {}  # line -> comment text (trailing comments only)
    sections: list[tuple[int, str]] = []  # (line, title) of "# --- title ---" lines
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type != tokenize.COMMENT:
            continue
        line = token.start[0]
        if token.line.strip().startswith("#"):
            match = _SECTION.match(token.string)
            if match:
                sections.append((line, match.group(1)))
        else:
            comments[line] = token.string.lstrip("#").strip()
    (classdef,) = ast.parse(source).body
    docs: dict[str, tuple[str | None, str]] = {}
    for node in classdef.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            comment = comments.get(node.end_lineno or node.lineno)
            if comment:
                section = max((s for s in sections if s[0] < node.lineno), default=(0, None))[1]
                docs[node.target.id] = (section, comment)
    return docs


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _shown(value: Any, flag: str, is_bool: bool) -> str | None:
    """How the help shows a default (None: no default worth showing, e.g. a required "")."""
    if value is dataclasses.MISSING or value == "":
        return None
    if is_bool:
        return flag if value else "--no-" + flag[2:]
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value) if value else "none given"
    return str(value)


def _converter(kind: type, nullable: bool):
    """Text -> ``kind`` (the word "none" -> None when ``nullable``); named for argparse's errors."""
    def convert(text: str) -> Any:
        if nullable and text.lower() == "none":
            return None
        return kind(text)

    convert.__name__ = kind.__name__ + (" or none" if nullable else "")
    convert.kind = kind
    return convert


_METAVARS = {int: "N", float: "X", str: "TEXT"}


def _unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    """(X, True) for ``X | None``, else (annotation, False)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and len(args) == 2:
            return rest[0], True
        raise TypeError(f"unions other than X | None have no option type: {annotation}")
    return annotation, False


def _argument(path: str, annotation: Any, choices: Sequence[Any] | None) -> dict[str, Any]:
    """add_argument keywords (type, nargs, choices, action) for a field annotation."""
    kind, nullable = _unwrap_optional(annotation)
    if kind is bool:
        if nullable:
            raise TypeError(f"{path}: bool | None has no option form (use bool)")
        return {"action": argparse.BooleanOptionalAction}
    keywords: dict[str, Any] = {}
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (list, tuple):
        if nullable:
            raise TypeError(f"{path}: a list or tuple that may be None has no option form")
        if origin is list:
            keywords["nargs"], kind = "*", args[0]
        elif len(args) == 2 and args[1] is Ellipsis:
            keywords["nargs"], kind = "+", args[0]
        elif args and all(a == args[0] for a in args):
            keywords["nargs"], kind = len(args), args[0]
        else:
            raise TypeError(f"{path}: tuples of mixed types have no option form: {annotation}")
        origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is Literal:
        choices = choices or args
        kind = type(args[0])
    if kind not in (int, float, str):
        raise TypeError(f"{path}: no option type for {annotation} (int, float, str, bool, X | None, "
                        f"list, tuple or Literal)")
    keywords["type"] = _converter(kind, nullable)
    if choices:
        keywords["choices"] = tuple(choices)
        keywords["metavar"] = "{" + ",".join("none" if c is None else str(c) for c in choices) + "}"
    return keywords


def add_dataclass_options(parser: argparse.ArgumentParser, cls: type, *, title: str,
                          renames: Mapping[str, str] | None = None, metavars: Mapping[str, str] | None = None,
                          choices: Mapping[str, Sequence[Any]] | None = None, prefix: str = "") -> list[str]:
    """Add an option for every field of the dataclass ``cls`` (recursing into dataclass fields).

    Args:
        parser: receives one argument group per section of fields.
        cls: the dataclass; its fields' trailing comments become the help.
        title: the group of the fields above the first ``# --- section ---`` line.
        renames: field path -> option string (e.g. {"data_dir": "--data"}); default --field-name.
        metavars: field path -> metavar; default N (int), X (float) or TEXT.
        choices: field path -> allowed values (None allowed for ``X | None`` fields).
        prefix: path of ``cls`` inside the outer configuration ("model." for its fields).

    Returns the field paths ("lr", "model.width", ...), which are also the options' ``dest``.
    Raises TypeError for a field type without an option form, and argparse.ArgumentError when
    two fields would get the same option string.
    """
    renames, metavars, choices = renames or {}, metavars or {}, choices or {}
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    groups: dict[str, argparse._ArgumentGroup] = {}
    paths: list[str] = []
    nested: list[tuple[dataclasses.Field, type]] = []  # their groups come after this class's own
    for f in dataclasses.fields(cls):
        path = prefix + f.name
        section, text = docs.get(f.name, (None, ""))
        annotation = hints[f.name]
        if dataclasses.is_dataclass(annotation):
            nested.append((f, annotation))
            continue
        group_title = f"{title}: {section}" if section and prefix else section or title
        if group_title not in groups:
            groups[group_title] = parser.add_argument_group(group_title)
        group = groups[group_title]
        flag = renames.get(path, "--" + f.name.replace("_", "-"))
        keywords = _argument(path, annotation, choices.get(path))
        is_bool = keywords.get("action") is argparse.BooleanOptionalAction
        if not is_bool:
            keywords.setdefault("metavar", metavars.get(path, _METAVARS[keywords["type"].kind]))
        shown = _shown(_default(f), flag, is_bool)
        help_text = text + (f" (default: {shown})" if shown is not None else "")
        group.add_argument(flag, dest=path, default=argparse.SUPPRESS, help=help_text.replace("%", "%%"),
                           **keywords)
        paths.append(path)
    for f, inner in nested:
        text = docs.get(f.name, (None, ""))[1]
        paths += add_dataclass_options(parser, inner, title=f"{f.name}: {text}" if text else f.name, renames=renames,
                                       metavars=metavars, choices=choices, prefix=prefix + f.name + ".")
    return paths


def field_paths(cls: type) -> list[str]:
    """The paths of the dataclass's fields, nested dataclasses expanded: ["lr", ..., "model.width", ...]."""
    hints = typing.get_type_hints(cls)
    paths: list[str] = []
    for f in dataclasses.fields(cls):
        inner = hints[f.name]
        paths += [f"{f.name}.{p}" for p in field_paths(inner)] if dataclasses.is_dataclass(inner) else [f.name]
    return paths


def given_options(args: argparse.Namespace, paths: Sequence[str]) -> dict[str, Any]:
    """{"lr": 0.25, "model": {"width": 2}}: the fields among ``paths`` given on the command line."""
    given: dict[str, Any] = {}
    values = vars(args)
    for path in paths:
        if path in values:
            *outer, name = path.split(".")
            level = given
            for key in outer:
                level = level.setdefault(key, {})
            level[name] = values[path]
    return given


def apply_options(config: Any, given: Mapping[str, Any]) -> Any:
    """A copy of the dataclass ``config`` with the values of :func:`given_options` put in
    (nested dicts go into nested dataclasses; option lists become tuples for tuple fields)."""
    hints = typing.get_type_hints(type(config))
    changes: dict[str, Any] = {}
    for name, value in given.items():
        if isinstance(value, dict):
            changes[name] = apply_options(getattr(config, name), value)
        elif typing.get_origin(_unwrap_optional(hints[name])[0]) is tuple and value is not None:
            changes[name] = tuple(value)
        else:
            changes[name] = list(value) if isinstance(value, list) else value
    return dataclasses.replace(config, **changes)
