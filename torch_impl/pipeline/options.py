"""Command-line options generated from configuration dataclasses: a setting is written once.

Every field of the dataclass (and of a nested dataclass field, e.g. ``TrainConfig.model``)
becomes an option:

    field name                  --field-name (or a rename, e.g. data_dir -> --data)
    int, float, str, Path       type=int, float, str, Path
    bool                        --field-name / --no-field-name
    X | None                    type X; the word "none" gives None (e.g. --pool none)
    list[X], tuple[X, ...]      nargs="*" ("+" without a default), "+" (tuple[X, X]: exactly 2 values)
    Literal["a", "b"]           choices (also from a table: {"sampler": ("balanced", "shuffle")})
    no default                  a required option (listed first)
    trailing "# comment"        the help, followed by the field's default (or "required")
    "# --- title ---" line      the option group of the fields below it
    option(flag=, metavar=, choices=, positional=)    the same choices made on the field itself

Fields inherited from a dataclass base class get the comments written there, so options
shared by several commands (``torch_impl.pipeline.predict.InferenceOptions``) are written once.

The parser's defaults are ``argparse.SUPPRESS``: an option that is not given leaves no trace
in the namespace, so :func:`apply_options` changes exactly the settings given on the command
line and a configuration file's values survive.

A command whose options are one dataclass uses :class:`OptionParser`:
``OptionParser(EvaluateOptions, prog=...).parse(argv)`` is an ``EvaluateOptions``. Its usage
errors (an unknown option, a bad value, a check in the dataclass's ``__post_init__`` that
raises ValueError) are one line on stderr and exit status 2.
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
from pathlib import Path
from typing import Any, Literal, NoReturn

__all__ = [
    "OptionParser",
    "add_dataclass_options",
    "apply_options",
    "build_options",
    "field_docs",
    "field_paths",
    "given_options",
    "option",
]

_SECTION = re.compile(r"^#\s*-{2,}\s*(.*?)\s*-{2,}\s*$")


@functools.cache
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


def _inherited_docs(cls: type) -> dict[str, tuple[str | None, str]]:
    """:func:`field_docs` of ``cls`` and of its dataclass bases (a redefined field: the subclass's)."""
    docs: dict[str, tuple[str | None, str]] = {}
    for base in reversed(cls.__mro__):
        if dataclasses.is_dataclass(base):
            docs.update(field_docs(base))
    return docs


def option(
    default: Any = dataclasses.MISSING,
    *,
    default_factory: Any = dataclasses.MISSING,
    flag: str | None = None,
    metavar: str | None = None,
    choices: Sequence[Any] | None = None,
    positional: bool = False,
) -> Any:
    """A dataclass field that also says how its option looks (a ``dataclasses.field``).

    Args:
        default, default_factory: as for ``dataclasses.field``; neither: a required option.
        flag: the option string (default ``--field-name``), e.g. "--data" for ``data_dir``.
        metavar: the value's name in the help (default N, X, TEXT or PATH by type).
        choices: the allowed values.
        positional: a positional argument instead of an option (``SLIDE...`` for a list field).
    """
    metadata = {
        "flag": flag,
        "metavar": metavar,
        "choices": tuple(choices) if choices is not None else None,
        "positional": positional,
    }
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


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
    return str(value)  # a Path as written


def _converter(kind: type, nullable: bool):
    """Text -> ``kind`` (the word "none" -> None when ``nullable``); named for argparse's errors."""

    def convert(text: str) -> Any:
        if nullable and text.lower() == "none":
            return None
        return kind(text)

    convert.__name__ = kind.__name__ + (" or none" if nullable else "")
    convert.kind = kind
    return convert


_METAVARS = {int: "N", float: "X", str: "TEXT", Path: "PATH"}


def _unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    """(X, True) for ``X | None``, else (annotation, False)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and len(args) == 2:
            return rest[0], True
        raise TypeError(f"unions other than X | None have no option type: {annotation}")
    return annotation, False


def _argument(path: str, annotation: Any, choices: Sequence[Any] | None, required: bool = False) -> dict[str, Any]:
    """add_argument keywords (type, nargs, choices, action) for a field annotation; ``required``:
    the field has no default (a list then takes at least one value)."""
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
            keywords["nargs"], kind = "+" if required else "*", args[0]
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
    if kind not in (int, float, str, Path):
        raise TypeError(
            f"{path}: no option type for {annotation} (int, float, str, Path, bool, X | None, list, tuple or Literal)"
        )
    keywords["type"] = _converter(kind, nullable)
    if choices:
        keywords["choices"] = tuple(choices)
        keywords["metavar"] = "{" + ",".join("none" if c is None else str(c) for c in choices) + "}"
    return keywords


def add_dataclass_options(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    title: str | None,
    renames: Mapping[str, str] | None = None,
    metavars: Mapping[str, str] | None = None,
    choices: Mapping[str, Sequence[Any]] | None = None,
    prefix: str = "",
) -> list[str]:
    """Add an option for every field of the dataclass ``cls`` (recursing into dataclass fields).

    Args:
        parser: receives one argument group per section of fields.
        cls: the dataclass; its fields' trailing comments become the help (those of fields
            inherited from a dataclass base: the base's). Fields without a default (required
            options, positional arguments) are added first.
        title: the group of the fields above the first ``# --- section ---`` line; None: the
            parser's own groups (positional arguments and options, with ``-h``).
        renames: field path -> option string (e.g. {"data_dir": "--data"}); default the
            field's ``option(flag=...)``, else --field-name.
        metavars: field path -> metavar; default the field's ``option(metavar=...)``, else N
            (int), X (float), TEXT (str) or PATH (Path).
        choices: field path -> allowed values (None allowed for ``X | None`` fields); default
            the field's ``option(choices=...)``.
        prefix: path of ``cls`` inside the outer configuration ("model." for its fields).

    Returns the field paths ("lr", "model.width", ...), which are also the options' ``dest``.
    Raises TypeError for a field type without an option form, and argparse.ArgumentError when
    two fields would get the same option string.
    """
    renames, metavars, choices = renames or {}, metavars or {}, choices or {}
    hints = typing.get_type_hints(cls)
    docs = _inherited_docs(cls)
    groups: dict[str | None, Any] = {None: parser}
    paths: list[str] = []
    nested: list[tuple[dataclasses.Field, type]] = []  # their groups come after this class's own
    required_first = sorted(dataclasses.fields(cls), key=lambda f: _default(f) is not dataclasses.MISSING)
    for f in required_first:
        path = prefix + f.name
        section, text = docs.get(f.name, (None, ""))
        annotation = hints[f.name]
        if dataclasses.is_dataclass(annotation):
            nested.append((f, annotation))
            continue
        group_title = f"{title}: {section}" if section and prefix and title else section or title
        if group_title not in groups:
            groups[group_title] = parser.add_argument_group(group_title)
        meta = f.metadata
        default = _default(f)
        required = default is dataclasses.MISSING
        keywords = _argument(path, annotation, choices.get(path, meta.get("choices")), required)
        is_bool = keywords.get("action") is argparse.BooleanOptionalAction
        if not is_bool:
            keywords["metavar"] = (
                keywords.get("metavar") or metavars.get(path) or meta.get("metavar") or _METAVARS[keywords["type"].kind]
            )
        if meta.get("positional"):
            if is_bool or not required:
                raise TypeError(f"{path}: a positional argument is a required field (no default), not a bool")
            names, suffix = [path], ""
        else:
            flag = renames.get(path) or meta.get("flag") or "--" + f.name.replace("_", "-")
            names, keywords["dest"], keywords["required"] = [flag], path, required
            shown = _shown(default, flag, is_bool)
            suffix = " (required)" if required else f" (default: {shown})" if shown is not None else ""
        groups[group_title].add_argument(
            *names, default=argparse.SUPPRESS, help=(text + suffix).replace("%", "%%"), **keywords
        )
        paths.append(path)
    for f, inner in nested:
        text = docs.get(f.name, (None, ""))[1]
        paths += add_dataclass_options(
            parser,
            inner,
            title=f"{f.name}: {text}" if text else f.name,
            renames=renames,
            metavars=metavars,
            choices=choices,
            prefix=prefix + f.name + ".",
        )
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


def _value(hint: Any, value: Any) -> Any:
    """An option's value as the field holds it: option lists become tuples for tuple fields."""
    if typing.get_origin(_unwrap_optional(hint)[0]) is tuple and value is not None:
        return tuple(value)
    return list(value) if isinstance(value, list) else value


def apply_options(config: Any, given: Mapping[str, Any]) -> Any:
    """A copy of the dataclass ``config`` with the values of :func:`given_options` put in
    (nested dicts go into nested dataclasses; option lists become tuples for tuple fields)."""
    hints = typing.get_type_hints(type(config))
    changes: dict[str, Any] = {}
    for name, value in given.items():
        if isinstance(value, dict):
            changes[name] = apply_options(getattr(config, name), value)
        else:
            changes[name] = _value(hints[name], value)
    return dataclasses.replace(config, **changes)


def build_options(cls: type, given: Mapping[str, Any]) -> Any:
    """A new ``cls`` from the values of :func:`given_options`, the fields' defaults for the rest
    (nested dicts build nested dataclasses). Raises what ``cls(...)`` raises, e.g. TypeError
    when a required field is missing, or the ValueError of a check in its ``__post_init__``."""
    hints = typing.get_type_hints(cls)
    values = {
        name: build_options(hints[name], value) if isinstance(value, dict) else _value(hints[name], value)
        for name, value in given.items()
    }
    return cls(**values)


class OptionParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line, and which can build a dataclass.

    ``OptionParser(Options, prog=..., description=...)`` has an option for every field of
    the dataclass ``Options`` (:func:`add_dataclass_options`, in the parser's own groups);
    :meth:`parse` returns an ``Options``. Without a dataclass it is a plain parser with the
    one-line errors (``train`` adds its options itself).

    A usage error (unknown option, bad value, missing required option, a ValueError of the
    dataclass's checks) prints ``PROG: error: MESSAGE`` and a pointer to ``--help`` on
    stderr, and exits with status 2 (argparse's status for usage errors), without the
    usage block that argparse prints (several lines for a long option list).
    """

    def __init__(self, options: type | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.options_class = options
        self.option_paths = add_dataclass_options(self, options, title=None) if options is not None else []

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n('{self.prog} --help' lists the options)\n")

    def options(self, args: argparse.Namespace) -> Any:
        """The options dataclass of parsed ``args``; a check of the dataclass that fails is a usage error."""
        if self.options_class is None:
            raise TypeError("this OptionParser has no options dataclass")
        try:
            return build_options(self.options_class, given_options(args, self.option_paths))
        except ValueError as e:
            self.error(str(e))

    def parse(self, argv: Sequence[str] | None = None) -> Any:
        """``self.options(self.parse_args(argv))``: the options dataclass of the command line."""
        return self.options(self.parse_args(argv))
