"""Templates: Jinja2 in its sandbox, compiled once per request, rendered per recipient.

Every text of `content` is a template (the From: name and address, the subject, the
bodies, each header value; a raw message's header fields and body each on their own).
A recipient's context is the request's `substitutions`, then its own (which win), then
`name` and `email` (always defined). Undefined names are errors (StrictUndefined); so is
anything the sandbox refuses (`{{ ''.__class__ }}`). The HTML body is escaped
(autoescape): a substitution holding `<` arrives as `&lt;` unless marked `|safe`.

A template that names no per-recipient value (the From: name from the request's
`substitutions`, a constant header) is rendered once per request. Problems are
`BadRequest(422, ...)` naming the template and its line.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Mapping, Set
from dataclasses import dataclass
from typing import Any

import jinja2
from jinja2 import meta
from jinja2.sandbox import SandboxedEnvironment, SecurityError

from mta.inject.request import BadRequest

MAX_REPEAT = 1_000_000  # the longest string a template may ask for in one step
MAX_POWER = 10_000  # the largest exponent `**` takes
MAX_OUTPUT = 64 * 1024**2  # the longest text one template may render (then the size limits)
# A width or precision of 7 digits or more in a %-format or a {}-format spec.
_WIDE_SPEC = re.compile(r"%[^%a-zA-Z]*\d{7}|\{[^{}]*:[^{}]*\d{7}")
_WIDTH_FILTERS = ("center", "indent", "wordwrap", "format", "truncate")


class LimitedSandbox(SandboxedEnvironment):
    """The sandbox, and no asking for a string of gigabytes in one step: `'x' * 10**10`,
    `'x'.center(10**9)`, `'x'|indent(10**9)`, `'%999999999s' % 'x'`, `'{:>999999999}'`.
    (A template's time is not bounded: only accounts may call the API.)"""

    intercepted_binops = frozenset({"*", "**", "%"})

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        for name in _WIDTH_FILTERS:
            self.filters[name] = _bounded(self.filters[name])

    def call_binop(self, context: Any, op: str, left: Any, right: Any) -> Any:
        if op == "**" and isinstance(right, int) and abs(right) > MAX_POWER:
            raise SecurityError(f"exponent {right} is too large")
        if op == "*":
            for seq, times in ((left, right), (right, left)):
                if (isinstance(seq, (str, list, tuple)) and isinstance(times, int)
                        and len(seq) * times > MAX_REPEAT):
                    raise SecurityError("the result of * would be too long")
        if op == "%" and isinstance(left, str):
            _check_arguments([left])
        return super().call_binop(context, op, left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        method = getattr(__obj, "__wrapped__", __obj)  # str.format comes wrapped
        owner = getattr(method, "__self__", None)
        if isinstance(owner, str):  # 'x'.center(n), '{:>n}'.format(...)
            _check_arguments([owner, *args, *kwargs.values()])
        return super().call(__context, __obj, *args, **kwargs)


def _check_arguments(values: list[Any]) -> None:
    for value in values:
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_REPEAT:
            raise SecurityError(f"{value} is too large a size")
        if isinstance(value, str) and _WIDE_SPEC.search(value):
            raise SecurityError("a format width or precision too large")


def _bounded(function: Callable[..., Any]) -> Callable[..., Any]:
    """A filter that refuses the sizes `_check_arguments` refuses."""

    @functools.wraps(function)  # keeps Jinja's pass_environment / pass_context marks
    def bounded(*args: Any, **kwargs: Any) -> Any:
        _check_arguments([*args, *kwargs.values()])
        return function(*args, **kwargs)

    return bounded


def _environment(autoescape: bool) -> LimitedSandbox:
    return LimitedSandbox(undefined=jinja2.StrictUndefined, autoescape=autoescape,
                          keep_trailing_newline=True, cache_size=0)


TEXT = _environment(autoescape=False)
HTML = _environment(autoescape=True)
_SYNTAX = ("{{", "{%", "{#")


@dataclass(slots=True)
class Template:
    """One text of the request: `name` and `first_line` say where it is, for errors.
    A template that names nothing that differs between the request's recipients
    (`shared`) is rendered once, for the first, and that text used for all."""

    name: str
    source: str
    compiled: jinja2.Template | None  # None: no template syntax, the text as it is
    first_line: int = 1
    shared: bool = False
    _text: str | None = None

    def render(self, context: Mapping[str, Any]) -> str:
        """The text for `context` (made by `context_for`: it holds Jinja's globals)."""
        if self.compiled is None:
            return self.source
        if self._text is not None:
            return self._text
        text = self._render(context)
        if self.shared:
            self._text = text
        return text

    def _render(self, context: Mapping[str, Any]) -> str:
        try:
            return _render(self.compiled, context)  # type: ignore[arg-type]
        except SecurityError as exc:
            raise self.problem(f"refused by the sandbox: {exc}", exc) from None
        except jinja2.UndefinedError as exc:
            raise self.problem(f"undefined: {exc.message}", exc) from None
        except Exception as exc:  # any error of the template's own code ({{ 1 / 0 }})
            raise self.problem(f"{type(exc).__name__}: {exc}", exc) from None

    def problem(self, message: str, exc: BaseException) -> BadRequest:
        line = _template_line(exc)
        where = f"{self.name}, line {self.first_line + line - 1}" if line else self.name
        return BadRequest(422, f"{where}: {message}")


def compile_template(name: str, source: str, varying: Set[str], html: bool = False,
                     first_line: int = 1) -> Template:
    """`source` compiled; BadRequest(422) naming the line of a syntax error. `varying`:
    the names whose values differ between recipients (a template naming none of them is
    rendered once)."""
    if not any(mark in source for mark in _SYNTAX):
        return Template(name, source, None, first_line)
    environment = HTML if html else TEXT
    try:
        tree = environment.parse(source)
    except jinja2.TemplateSyntaxError as exc:
        raise BadRequest(422, f"{name}, line {first_line + (exc.lineno or 1) - 1}: "
                              f"syntax error: {exc.message}") from None
    shared = not meta.find_undeclared_variables(tree) & varying
    return Template(name, source, environment.from_string(tree), first_line, shared)


def varying_names(recipients: Iterable[Any]) -> frozenset[str]:
    """The names whose values may differ between recipients: name, email and every
    name some recipient's substitutions give."""
    names = {"name", "email"}
    for recipient in recipients:
        names.update(recipient.substitutions)
    return frozenset(names)


def _template_line(exc: BaseException) -> int | None:
    """The template line an exception was raised at (Jinja rewrites the traceback)."""
    line = None
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def _render(compiled: jinja2.Template, context: Mapping[str, Any]) -> str:
    """`compiled.render(context)`, no longer than MAX_OUTPUT, and without copying Jinja's
    globals into a new dict for each template: `context_for` put them in the recipient's
    context, made once for all of its templates (a shared context is passed as it is,
    Jinja's documented use)."""
    try:
        pieces, size = [], 0
        for piece in compiled.root_render_func(compiled.new_context(context, shared=True)):
            size += len(piece)
            if size > MAX_OUTPUT:
                raise SecurityError(f"the text would be longer than {MAX_OUTPUT} characters")
            pieces.append(piece)
        return "".join(pieces)
    except Exception:
        compiled.environment.handle_exception()  # raises it with the template's lines
        raise


def context_for(globals_: Mapping[str, Any], own: Mapping[str, Any], email: str, name: str
                ) -> dict[str, Any]:
    """A recipient's substitutions: Jinja's globals (range, dict, ...), the request's
    substitutions, its own over them, then name and email."""
    return {**TEXT.globals, **globals_, **own, "name": name, "email": email}


_NEWLINE = re.compile(r"\r\n|\r|\n")


def crlf(text: str) -> str:
    """Every line break (CRLF, bare CR, bare LF) as CRLF."""
    return _NEWLINE.sub("\r\n", text)


def header_value(template: Template, context: Mapping[str, Any]) -> str:
    """A rendered header value: one line (CR, LF or NUL in it would start a new field)."""
    value = template.render(context)
    if "\r" in value or "\n" in value or "\0" in value:
        raise BadRequest(422, f"{template.name}: the rendered value holds CR, LF or NUL "
                              "(a header value is one line)")
    return value
