"""Rule conditions: a rule's ``when`` is a CEL expression, checked at load, run in Rust.

A condition is a `Common Expression Language <https://cel.dev>`_ expression over three
variables, e.g. ``profile.segment == "youth" && "jazz" in profile.prefs.music``. It is

* **checked once, when the rules are loaded**: this module parses it with its own small
  CEL parser (so that limits hold before anything else sees the text), type-checks it
  against the documented variables below (an unknown variable or field, a comparison of
  a string with an int, a non-bool result are load errors naming the rule), bounds its
  size (characters, AST depth and nodes, nested loops), and then has the
  ``common-expression-language`` package (the Rust ``cel`` crate) compile it once into
  a program, whose operators and functions are checked against an allow list;
* **run only when the rule's trigger has fired**, by that compiled program, with just the
  fields the expression names. Nothing is ever run by Python ``eval``; CEL has no I/O,
  no imports, no attribute access on Python objects, and no custom function is
  registered, so a condition can only compute over the values handed to it. A runtime
  error (a missing map key, a bad conversion) is :class:`ConditionError`: the engine
  counts it and treats the condition as false.

The variables (a missing text is ``""``, never ``null``):

``event`` (the event that fired the trigger; fields depend on the trigger kind)
    every kind: ``type`` (``click``/``location``/``calls``), ``ts`` (int, epoch ms),
    ``customer_id``. Clicks (``module_enter``, ``session_start_unconfigured``,
    ``trial_ending``) add ``event_id``, ``terminal_id``, ``hall_id``, ``action``,
    ``module``, ``step`` and ``attrs`` (map of string to dyn); location events
    (``location_frequency``) add ``event_id``, ``cell_id``, ``poi``, ``poi_id``; call
    records (``call_spike``) add ``event_id`` and the ints ``interval_s``,
    ``calls_in``, ``calls_out``, ``missed``. ``step_dwell`` fires on a timer: its event
    is the step being dwelt on, ``action`` ``step_enter``, ``ts`` the time it was
    entered, ``terminal_id``, ``hall_id``, ``module``, ``step``.
``profile``
    ``customer_id``, ``segment``, ``handset`` (strings), ``subscriptions``,
    ``configured`` (sorted lists of strings), ``prefs`` (map of string to list of
    strings), ``trials`` (map of service to end time, epoch ms), ``opt_out`` (bool).
``context``
    ``rule`` (id), ``rule_version``, ``hall``, ``terminal`` (of the open session, else
    ``""``), ``module`` (what the push is about: the module or service), ``ts`` (int,
    epoch ms: the trigger's event time), ``hour`` (0-23), ``minute`` (0-59) and
    ``weekday`` (1 = Monday .. 7 = Sunday) of ``ts`` in the rules file's ``timezone``.

Supported CEL: literals (int, uint, double, string, bytes, bool, null), lists, maps,
``! - * / % + < <= > >= == != in && || ?:``, field selection and indexing, ``has()``,
the macros ``all``, ``exists``, ``exists_one``, ``map``, ``filter``, and the functions
``size``, ``contains``, ``startsWith``, ``endsWith``, ``matches`` (a quoted RE2-style
pattern, checked at load; linear time), ``int``, ``uint``, ``double``, ``string``,
``bytes`` and ``dyn``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final
from zoneinfo import ZoneInfo

from flows.model import Profile

__all__ = [
    "CONDITION_TRIGGERS",
    "CelError",
    "Condition",
    "ConditionError",
    "DwellEvent",
    "compile_condition",
]


class CelError(ValueError):
    """A ``when`` expression that cannot be used; the message starts with ``when:``."""


class ConditionError(Exception):
    """A condition failed at run time (the engine counts it; the condition is false).

    The message is the CEL error's class name only: runtime messages can quote values
    (a map key taken from the event), and values may be personal data.
    """


# --- types ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CelType:
    """A CEL type as the checker sees it: a primitive, ``list(T)``, ``map(K, V)``,
    ``dyn`` (anything, checked at run time) or one of the three variables (``record``)."""

    name: str
    params: tuple[CelType, ...] = ()

    def __str__(self) -> str:
        if self.params:
            return f"{self.name}({', '.join(str(p) for p in self.params)})"
        return self.name


BOOL: Final = CelType("bool")
INT: Final = CelType("int")
UINT: Final = CelType("uint")
DOUBLE: Final = CelType("double")
STRING: Final = CelType("string")
BYTES: Final = CelType("bytes")
NULL: Final = CelType("null")
DYN: Final = CelType("dyn")
_NUMERIC: Final = frozenset({"int", "uint", "double"})
_ORDERED: Final = frozenset({"int", "uint", "double", "string", "bytes", "bool"})


def _list(t: CelType) -> CelType:
    return CelType("list", (t,))


def _map(k: CelType, v: CelType) -> CelType:
    return CelType("map", (k, v))


def _record(name: str) -> CelType:
    return CelType("record:" + name)


_EVENT_BASE: Final = {"type": STRING, "ts": INT, "customer_id": STRING}
_CLICK: Final = {
    **_EVENT_BASE, "event_id": STRING, "terminal_id": STRING, "hall_id": STRING,
    "action": STRING, "module": STRING, "step": STRING, "attrs": _map(STRING, DYN),
}
_LOCATION: Final = {**_EVENT_BASE, "event_id": STRING, "cell_id": STRING, "poi": STRING,
                    "poi_id": STRING}
_CALLS: Final = {**_EVENT_BASE, "event_id": STRING, "interval_s": INT, "calls_in": INT,
                 "calls_out": INT, "missed": INT}
_DWELL: Final = {**_EVENT_BASE, "terminal_id": STRING, "hall_id": STRING, "action": STRING,
                 "module": STRING, "step": STRING}

#: The event fields a condition may use, by trigger kind (step_friction has none: it
#: concerns many customers at once).
CONDITION_TRIGGERS: Final[Mapping[str, Mapping[str, CelType]]] = {
    "location_frequency": _LOCATION,
    "call_spike": _CALLS,
    "module_enter": _CLICK,
    "session_start_unconfigured": _CLICK,
    "trial_ending": _CLICK,
    "step_dwell": _DWELL,
}
_PROFILE: Final = {
    "customer_id": STRING, "segment": STRING, "handset": STRING,
    "subscriptions": _list(STRING), "configured": _list(STRING),
    "prefs": _map(STRING, _list(STRING)), "trials": _map(STRING, INT), "opt_out": BOOL,
}
_CONTEXT: Final = {
    "rule": STRING, "rule_version": INT, "hall": STRING, "terminal": STRING,
    "module": STRING, "ts": INT, "hour": INT, "minute": INT, "weekday": INT,
}
VARIABLES: Final = ("event", "profile", "context")


# --- lexer ------------------------------------------------------------------------------

_RESERVED: Final = frozenset({
    "as", "break", "const", "continue", "else", "for", "function", "if", "import", "let",
    "loop", "package", "namespace", "return", "var", "void", "while",
})
_TOKEN: Final = re.compile(
    r"""
    (?P<ws>[ \t\r\n\f]+|//[^\n]*)
  | (?P<str>(?:[rR][bB]?|[bB][rR]?)?(?:'''|\"\"\"|'|"))
  | (?P<num>0x[0-9a-fA-F]+[uU]?|[0-9]*\.[0-9]+(?:[eE][+-]?[0-9]+)?
            |[0-9]+[eE][+-]?[0-9]+|[0-9]+[uU]?)
  | (?P<id>[_a-zA-Z][_a-zA-Z0-9]*)
  | (?P<op>==|!=|<=|>=|&&|\|\||[<>!+\-*/%?:.,()\[\]{}])
    """,
    re.VERBOSE,
)


@dataclass(frozen=True, slots=True)
class _Tok:
    kind: str  # str, num, id, op, end
    text: str
    pos: int  # 0-based offset in the source


def _string_end(src: str, start: int, prefix_len: int, quote: str) -> int:
    """The offset just after a string literal whose quote starts at ``start+prefix``."""
    raw = "r" in src[start : start + prefix_len].lower()
    i = start + prefix_len + len(quote)
    n = len(src)
    while i < n:
        if src.startswith(quote, i):
            return i + len(quote)
        ch = src[i]
        if ch == "\\" and not raw:
            i += 2
            continue
        if ch in "\r\n" and len(quote) == 1:
            break
        i += 1
    raise CelError(f"when: syntax error at column {start + 1}: unterminated string")


def _tokens(src: str) -> list[_Tok]:
    out: list[_Tok] = []
    i = 0
    n = len(src)
    while i < n:
        m = _TOKEN.match(src, i)
        if m is None:
            raise CelError(f"when: syntax error at column {i + 1}: unexpected {src[i]!r}")
        kind = m.lastgroup
        assert kind is not None
        if kind == "ws":
            i = m.end()
            continue
        if kind == "str":
            opener = m.group()
            quote = opener.lstrip("rRbB")
            end = _string_end(src, i, len(opener) - len(quote), quote)
            out.append(_Tok("bytes" if "b" in opener[: -len(quote)].lower() else "str",
                            src[i:end], i))
            i = end
            continue
        text = m.group()
        if kind == "id" and text in _RESERVED:
            raise CelError(f"when: syntax error at column {i + 1}: {text!r} is a reserved word")
        out.append(_Tok(kind, text, i))
        i = m.end()
    out.append(_Tok("end", "", n))
    return out


# --- parser -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Node:
    """One AST node. ``kind``: lit, ident, select, index, call, list, map, unary,
    binary, cond, has, loop; ``value``: the literal type, name, operator or function;
    ``target``: a method call's receiver, a loop's range; ``var``: a loop's variable or
    a literal's source text."""

    kind: str
    pos: int
    value: str = ""
    args: tuple[_Node, ...] = ()
    target: _Node | None = None
    var: str = ""
    depth: int = 1


_MACROS: Final = frozenset({"all", "exists", "exists_one", "map", "filter"})
_RELOPS: Final = frozenset({"<", "<=", ">", ">=", "==", "!=", "in"})


class _Parser:
    """Recursive descent over the CEL grammar, bounded in depth and node count."""

    def __init__(self, src: str, max_depth: int, max_nodes: int) -> None:
        self.toks = _tokens(src)
        self.i = 0
        self.max_depth = max_depth
        self.max_nodes = max_nodes
        self.nodes = 0
        self.nest = 0

    # tokens
    @property
    def tok(self) -> _Tok:
        return self.toks[self.i]

    def _is(self, text: str) -> bool:
        t = self.tok
        return t.kind in ("op", "id") and t.text == text

    def _take(self, text: str) -> _Tok:
        t = self.tok
        if not self._is(text):
            raise self._error(f"expected {text!r}")
        self.i += 1
        return t

    def _error(self, what: str) -> CelError:
        t = self.tok
        found = "end of input" if t.kind == "end" else repr(t.text)
        return CelError(f"when: syntax error at column {t.pos + 1}: {what}, found {found}")

    def _node(self, kind: str, pos: int, value: str = "", args: tuple[_Node, ...] = (),
              target: _Node | None = None, var: str = "") -> _Node:
        kids = args if target is None else (target, *args)
        depth = 1 + max((k.depth for k in kids), default=0)
        if depth > self.max_depth:
            raise CelError(f"when: too complex: nested more than {self.max_depth} levels "
                           f"deep (at column {pos + 1})")
        self.nodes += 1
        if self.nodes > self.max_nodes:
            raise CelError(f"when: too complex: more than {self.max_nodes} nodes")
        return _Node(kind, pos, value, args, target, var, depth)

    # grammar
    def parse(self) -> _Node:
        e = self.expr()
        if self.tok.kind != "end":
            raise self._error("expected an operator or the end")
        return e

    def expr(self) -> _Node:
        self.nest += 1
        if self.nest > self.max_depth:
            raise CelError(f"when: too complex: nested more than {self.max_depth} levels "
                           f"deep (at column {self.tok.pos + 1})")
        try:
            cond = self._binary(0)
            if self._is("?"):
                pos = self._take("?").pos
                then = self._binary(0)
                self._take(":")
                other = self.expr()
                return self._node("cond", pos, "?:", (cond, then, other))
            return cond
        finally:
            self.nest -= 1

    _LEVELS: Final = (("||",), ("&&",), tuple(_RELOPS), ("+", "-"), ("*", "/", "%"))

    def _binary(self, level: int) -> _Node:
        if level == len(self._LEVELS):
            return self._unary()
        ops = self._LEVELS[level]
        left = self._binary(level + 1)
        if level < 2:  # '||' and '&&' chains become balanced trees, as in cel-go
            terms = [left]
            seps: list[_Tok] = []
            while self._is(ops[0]):
                seps.append(self.tok)
                self.i += 1
                terms.append(self._binary(level + 1))
            return self._balance(terms, seps)
        while self.tok.kind in ("op", "id") and self.tok.text in ops:
            op = self.tok
            self.i += 1
            right = self._binary(level + 1)
            left = self._node("binary", op.pos, op.text, (left, right))
        return left

    def _balance(self, terms: list[_Node], seps: list[_Tok]) -> _Node:
        if len(terms) == 1:
            return terms[0]
        mid = len(terms) // 2
        left = self._balance(terms[:mid], seps[: mid - 1])
        right = self._balance(terms[mid:], seps[mid:])
        op = seps[mid - 1]
        return self._node("binary", op.pos, op.text, (left, right))

    def _unary(self) -> _Node:
        ops: list[_Tok] = []
        while self._is("!") or self._is("-"):
            ops.append(self.tok)
            self.i += 1
        node = self._member()
        for op in reversed(ops):
            node = self._node("unary", op.pos, op.text, (node,))
        return node

    def _member(self) -> _Node:
        node = self._primary()
        while True:
            if self._is("."):
                self.i += 1
                name = self.tok
                if name.kind != "id" or name.text in ("true", "false", "null", "in"):
                    raise self._error("expected a field name after '.'")
                self.i += 1
                if self._is("("):
                    args = self._args("(", ")")
                    node = self._call(name, node, args)
                else:
                    node = self._node("select", name.pos, name.text, (), node)
            elif self._is("["):
                pos = self._take("[").pos
                idx = self.expr()
                self._take("]")
                node = self._node("index", pos, "[]", (idx,), node)
            else:
                return node

    def _args(self, open_: str, close: str) -> tuple[_Node, ...]:
        self._take(open_)
        args: list[_Node] = []
        while not self._is(close):
            args.append(self.expr())
            if not self._is(","):
                break
            self.i += 1
        self._take(close)
        return tuple(args)

    def _call(self, name: _Tok, target: _Node | None, args: tuple[_Node, ...]) -> _Node:
        fn = name.text
        if target is not None and fn in _MACROS:
            arity = (2, 3) if fn == "map" else (2,)
            if len(args) not in arity:
                raise CelError(f"when: syntax error at column {name.pos + 1}: {fn}() takes "
                               + ("2 or 3 arguments" if fn == "map" else "2 arguments"))
            var = args[0]
            if var.kind != "ident":
                raise CelError(f"when: syntax error at column {var.pos + 1}: the first "
                               f"argument of {fn}() must be a variable name")
            return self._node("loop", name.pos, fn, args[1:], target, var.value)
        if target is None and fn == "has":
            if len(args) != 1 or args[0].kind != "select":
                raise CelError(f"when: syntax error at column {name.pos + 1}: has() takes "
                               "one field selection, like has(event.attrs.channel)")
            return self._node("has", name.pos, "has", (args[0],))
        return self._node("call", name.pos, fn, args, target)

    def _primary(self) -> _Node:
        t = self.tok
        if t.kind in ("num", "str", "bytes"):
            self.i += 1
            if t.kind == "str":
                typ = "string"
            elif t.kind == "bytes":
                typ = "bytes"
            elif t.text[-1] in "uU":
                typ = "uint"
            elif "." in t.text or ("e" in t.text.lower() and not t.text.lower()
                                   .startswith("0x")):
                typ = "double"
            else:
                typ = "int"
            return self._node("lit", t.pos, typ, var=t.text)
        if t.kind == "id":
            self.i += 1
            if t.text in ("true", "false"):
                return self._node("lit", t.pos, "bool", var=t.text)
            if t.text == "null":
                return self._node("lit", t.pos, "null", var=t.text)
            if t.text == "in":
                raise CelError(f"when: syntax error at column {t.pos + 1}: "
                               "expected an expression, found 'in'")
            if self._is("("):
                return self._call(t, None, self._args("(", ")"))
            if self._is("{"):
                raise CelError(f"when: syntax error at column {t.pos + 1}: message "
                               "construction is not supported")
            return self._node("ident", t.pos, t.text)
        if self._is("("):
            self.i += 1
            e = self.expr()
            self._take(")")
            return e
        if self._is("["):
            pos = t.pos
            items = self._args("[", "]")
            return self._node("list", pos, "[]", items)
        if self._is("{"):
            pos = t.pos
            self.i += 1
            entries: list[_Node] = []
            while not self._is("}"):
                k = self.expr()
                self._take(":")
                entries += (k, self.expr())
                if not self._is(","):
                    break
                self.i += 1
            self._take("}")
            return self._node("map", pos, "{}", tuple(entries))
        if self._is("."):
            raise self._error("a leading '.' is not supported")
        raise self._error("expected an expression")


# --- checker ----------------------------------------------------------------------------

# Member and global functions: name -> (receiver/argument types) -> result.
_STRING_PREDICATES: Final = frozenset({"contains", "startsWith", "endsWith", "matches"})
_CONVERSIONS: Final = {
    "int": (frozenset({"int", "uint", "double", "string"}), INT),
    "uint": (frozenset({"int", "uint", "double", "string"}), UINT),
    "double": (frozenset({"int", "uint", "double", "string"}), DOUBLE),
    "string": (frozenset({"int", "uint", "double", "string", "bytes"}), STRING),
    "bytes": (frozenset({"string", "bytes"}), BYTES),
}
#: Everything the compiled program may call (CEL operator ids and functions); checked
#: against what the Rust compiler reports, so nothing else can slip through.
ALLOWED_FUNCTIONS: Final = frozenset({
    "!_", "-_", "_?_:_", "_[_]", "@not_strictly_false", "_&&_", "_||_", "_+_", "_-_",
    "_*_", "_/_", "_%_", "_==_", "_!=_", "_<_", "_<=_", "_>_", "_>=_", "@in",
    "size", *_STRING_PREDICATES, *_CONVERSIONS, "dyn",
})


def _is_dyn(t: CelType) -> bool:
    return t.name == "dyn"


def _same(a: CelType, b: CelType) -> bool:
    """Could values of ``a`` and ``b`` be equal (dyn matches anything)?"""
    if _is_dyn(a) or _is_dyn(b):
        return True
    if a.name in _NUMERIC and b.name in _NUMERIC:
        return True  # CEL compares numbers across int, uint and double
    if a.name != b.name or len(a.params) != len(b.params):
        return False
    return all(_same(x, y) for x, y in zip(a.params, b.params, strict=True))


def _join(a: CelType, b: CelType) -> CelType:
    return a if a == b else DYN


class _Checker:
    """Infers the type of every node; raises :class:`CelError` on the first problem."""

    def __init__(self, kind: str, max_loops: int) -> None:
        self.kind = kind
        self.records: dict[str, Mapping[str, CelType]] = {
            "event": CONDITION_TRIGGERS[kind], "profile": _PROFILE, "context": _CONTEXT,
        }
        self.used: dict[str, set[str]] = {v: set() for v in VARIABLES}
        # Map fields (event.attrs, profile.prefs, profile.trials): how often each is used,
        # and which keys when used as ``var.field.key``. A map used only that way is
        # handed to CEL with just those keys (an attrs map can hold 4 KB).
        self.field_uses: dict[tuple[str, str], int] = {}
        self.keyed: dict[tuple[str, str], set[str]] = {}
        self.keyed_uses: dict[tuple[str, str], int] = {}
        self.scope: dict[str, CelType] = {}
        self.loops = 0
        self.max_loops = max_loops
        self.regexes: list[_Node] = []

    def fail(self, node: _Node, msg: str) -> CelError:
        return CelError(f"when: {msg} (at column {node.pos + 1})")

    def value(self, node: _Node) -> CelType:
        """The type of a node used as a value (a whole variable is not a value)."""
        t = self.check(node)
        if t.name.startswith("record:"):
            name = t.name[7:]
            raise self.fail(node, f"{name} is not a value; use one of its fields, like "
                                  f"{name}.{sorted(self.records[name])[0]}")
        return t

    def check(self, n: _Node) -> CelType:
        k = n.kind
        if k == "lit":
            return CelType(n.value)
        if k == "ident":
            if n.value in self.scope:
                return self.scope[n.value]
            if n.value in self.records:
                return _record(n.value)
            raise self.fail(n, f"unknown variable {n.value!r}; the variables are event, "
                               "profile and context")
        if k == "select":
            assert n.target is not None
            return self._select(n, n.target)
        if k == "has":
            sel = n.args[0]
            assert sel.target is not None
            self._select(sel, sel.target)
            return BOOL
        if k == "index":
            assert n.target is not None
            return self._index(n, self.value(n.target), self.value(n.args[0]))
        if k == "list":
            elem: CelType | None = None
            for a in n.args:
                t = self.value(a)
                elem = t if elem is None else _join(elem, t)
            return _list(elem or DYN)
        if k == "map":
            key: CelType | None = None
            val: CelType | None = None
            for i in range(0, len(n.args), 2):
                kt = self.value(n.args[i])
                if kt.name not in ("string", "int", "uint", "bool", "dyn"):
                    raise self.fail(n.args[i], f"a map key must be a string, int, uint or "
                                               f"bool, not {kt}")
                vt = self.value(n.args[i + 1])
                key = kt if key is None else _join(key, kt)
                val = vt if val is None else _join(val, vt)
            return _map(key or DYN, val or DYN)
        if k == "unary":
            t = self.value(n.args[0])
            if n.value == "!":
                return self._want_bool(n.args[0], t, "'!'")
            if t.name in ("int", "double", "dyn"):
                return t
            raise self.fail(n, f"'-' needs an int or a double, not {t}")
        if k == "binary":
            return self._binary(n)
        if k == "cond":
            self._want_bool(n.args[0], self.value(n.args[0]), "the condition of '?:'")
            yes, no = self.value(n.args[1]), self.value(n.args[2])
            if not _same(yes, no):
                raise self.fail(n, f"the branches of '?:' differ: {yes} and {no}")
            return _join(yes, no)
        if k == "loop":
            return self._loop(n)
        if k == "call":
            return self._call(n)
        raise AssertionError(k)  # pragma: no cover - every parser node kind is above

    def _want_bool(self, node: _Node, t: CelType, what: str) -> CelType:
        if t.name not in ("bool", "dyn"):
            raise self.fail(node, f"{what} needs a bool, not {t}")
        return BOOL

    def _select(self, n: _Node, target: _Node) -> CelType:
        t = self.check(target)
        if t.name.startswith("record:"):
            name = t.name[7:]
            fields = self.records[name]
            if n.value not in fields:
                extra = f" for trigger {self.kind}" if name == "event" else ""
                raise self.fail(n, f"unknown field {n.value!r} of {name}{extra}; {name} has "
                                   + ", ".join(sorted(fields)))
            self.used[name].add(n.value)
            key = (name, n.value)
            self.field_uses[key] = self.field_uses.get(key, 0) + 1
            return fields[n.value]
        if t.name == "map" and t.params[0].name in ("string", "dyn"):
            inner = target.target
            if target.kind == "select" and inner is not None and inner.kind == "ident" \
                    and inner.value in self.records:
                key = (inner.value, target.value)
                self.keyed.setdefault(key, set()).add(n.value)
                self.keyed_uses[key] = self.keyed_uses.get(key, 0) + 1
            return t.params[1]
        if _is_dyn(t):
            return DYN
        raise self.fail(n, f"{t} has no fields (.{n.value})")

    def _index(self, n: _Node, t: CelType, i: CelType) -> CelType:
        if t.name == "list":
            if i.name not in ("int", "uint", "dyn"):
                raise self.fail(n, f"a list index must be an int, not {i}")
            return t.params[0]
        if t.name == "map":
            if not _same(i, t.params[0]):
                raise self.fail(n, f"a {t} cannot be indexed with {i}")
            return t.params[1]
        if _is_dyn(t):
            return DYN
        raise self.fail(n, f"{t} cannot be indexed")

    def _binary(self, n: _Node) -> CelType:
        op = n.value
        a, b = self.value(n.args[0]), self.value(n.args[1])
        if op in ("&&", "||"):
            self._want_bool(n.args[0], a, f"'{op}'")
            self._want_bool(n.args[1], b, f"'{op}'")
            return BOOL
        if op in ("==", "!="):
            if not _same(a, b):
                raise self.fail(n, f"'{op}' compares {a} with {b}, which is never equal")
            return BOOL
        if op in ("<", "<=", ">", ">="):
            ok = ((_is_dyn(a) and (_is_dyn(b) or b.name in _ORDERED))
                  or (_is_dyn(b) and a.name in _ORDERED)
                  or (a.name in _NUMERIC and b.name in _NUMERIC)
                  or (a.name == b.name and a.name in _ORDERED))
            if not ok:
                raise self.fail(n, f"'{op}' cannot order {a} and {b}")
            return BOOL
        if op == "in":
            if b.name == "list":
                if not _same(a, b.params[0]):
                    raise self.fail(n, f"'in': {a} is never in {b}")
            elif b.name == "map":
                if not _same(a, b.params[0]):
                    raise self.fail(n, f"'in': {a} is never a key of {b}")
            elif not _is_dyn(b):
                raise self.fail(n, f"'in' needs a list or a map on its right, not {b}")
            return BOOL
        # arithmetic
        allowed = {"+": ("int", "uint", "double", "string", "bytes", "list"),
                   "-": ("int", "uint", "double"), "*": ("int", "uint", "double"),
                   "/": ("int", "uint", "double"), "%": ("int", "uint")}[op]
        if _is_dyn(a) and _is_dyn(b):
            return DYN
        if _is_dyn(a) or _is_dyn(b):
            known = b if _is_dyn(a) else a
            if known.name not in allowed:
                raise self.fail(n, f"'{op}' does not apply to {known}")
            return known if known.name != "list" else DYN
        if a.name != b.name or a.name not in allowed:
            raise self.fail(n, f"'{op}' does not apply to {a} and {b} (CEL does not convert "
                               "between types: use int(), double() or string())")
        if a.name == "list":
            return _list(_join(a.params[0], b.params[0]))
        return a

    def _loop(self, n: _Node) -> CelType:
        assert n.target is not None
        r = self.value(n.target)
        if r.name == "list":
            elem = r.params[0]
        elif r.name == "map":
            elem = r.params[0]
        elif _is_dyn(r):
            elem = DYN
        else:
            raise self.fail(n, f"{n.value}() needs a list or a map, not {r}")
        if n.var in self.records or n.var in self.scope:
            raise self.fail(n, f"{n.value}(): the name {n.var!r} is already taken")
        self.loops += 1
        if self.loops > self.max_loops:
            raise CelError(f"when: too complex: more than {self.max_loops} nested loops "
                           f"(all, exists, exists_one, map, filter) (at column {n.pos + 1})")
        self.scope[n.var] = elem
        try:
            if n.value == "map":
                if len(n.args) == 2:
                    self._want_bool(n.args[0], self.value(n.args[0]), "the filter of map()")
                return _list(self.value(n.args[-1]))
            self._want_bool(n.args[0], self.value(n.args[0]), f"the predicate of {n.value}()")
            return _list(elem) if n.value == "filter" else BOOL
        finally:
            del self.scope[n.var]
            self.loops -= 1

    def _call(self, n: _Node) -> CelType:
        fn = n.value
        args = n.args if n.target is None else (n.target, *n.args)
        if fn == "size" and len(args) == 1:
            t = self.value(args[0])
            if t.name not in ("string", "bytes", "list", "map", "dyn"):
                raise self.fail(n, f"size() needs a string, bytes, list or map, not {t}")
            return INT
        if fn in _STRING_PREDICATES and n.target is not None and len(args) == 2:
            for a in args:
                t = self.value(a)
                if t.name not in ("string", "dyn"):
                    raise self.fail(a, f"{fn}() works on strings, not {t}")
            if fn == "matches":
                if args[1].kind != "lit" or args[1].value != "string":
                    # a pattern from the data could be made costly to compile
                    raise self.fail(args[1], "matches() takes a quoted pattern, not a "
                                             "computed one")
                self.regexes.append(args[1])
            return BOOL
        if fn in _CONVERSIONS and n.target is None and len(args) == 1:
            sources, result = _CONVERSIONS[fn]
            t = self.value(args[0])
            if t.name not in sources and not _is_dyn(t):
                raise self.fail(n, f"{fn}() cannot convert {t}")
            return result
        if fn == "dyn" and n.target is None and len(args) == 1:
            self.value(args[0])
            return DYN
        known = ("size", *sorted(_STRING_PREDICATES), *_CONVERSIONS, "dyn", "has",
                 *sorted(_MACROS))
        if fn in known:
            raise self.fail(n, f"{fn}() is not used like that here (wrong receiver or "
                               "number of arguments)")
        raise self.fail(n, f"unknown function {fn!r}; the functions are "
                           + ", ".join(known))


# --- compiled conditions ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DwellEvent:
    """The event of a ``step_dwell`` firing: the step being dwelt on (built only for a
    rule with a condition)."""

    customer_id: str
    ts: int
    terminal_id: str
    hall_id: str
    module: str
    step: str
    type: str = "click"
    action: str = "step_enter"


_PROFILE_GET: Final[Mapping[str, Callable[[Profile], Any]]] = {
    "customer_id": lambda p: p.customer_id,
    "segment": lambda p: p.segment or "",
    "handset": lambda p: p.handset or "",
    "subscriptions": lambda p: sorted(p.subscriptions),
    "configured": lambda p: sorted(p.configured),
    "prefs": lambda p: p.prefs,
    "trials": lambda p: p.trials,
    "opt_out": lambda p: p.opt_out,
}


def _compile_program(source: str) -> Any:
    # The package is imported on first use: its command-line part costs ~0.1 s of
    # imports that a rule set without conditions should not pay.
    import cel  # noqa: PLC0415

    return cel.compile(source)


@dataclass(frozen=True, slots=True)
class Condition:
    """A rule's compiled ``when``: checked, bounded, compiled once; cheap to run.

    ``holds`` builds only the fields the expression names, and of a map field used only
    as ``map.key`` only those keys (its cost is mostly handing values to the Rust
    evaluator: ~0.3 µs per int, ~1 µs per string).
    """

    source: str
    trigger_kind: str
    rule_id: str
    rule_version: int
    timezone: str
    event_fields: tuple[str, ...]
    profile_fields: tuple[str, ...]
    context_fields: tuple[str, ...]
    narrow: tuple[tuple[str, str, tuple[str, ...]], ...]
    limits: tuple[int, int, int, int] = field(repr=False)
    program: Any = field(compare=False, repr=False)
    tz: ZoneInfo = field(compare=False, repr=False)

    def __reduce__(self) -> tuple[Any, ...]:
        # The compiled Rust program does not pickle: a copy recompiles from the source.
        return (_recompile, (self.source, self.trigger_kind, self.rule_id,
                             self.rule_version, self.timezone, self.limits))

    def holds(
        self,
        event: Any,
        profile: Profile,
        hall: str,
        terminal: str,
        module: str,
        ts: int,
    ) -> bool:
        """Evaluate for one firing; raise :class:`ConditionError` if evaluation fails.

        ``event`` is the triggering :class:`~flows.model.ClickEvent`,
        :class:`~flows.model.LocationEvent`, :class:`~flows.model.CallsEvent` or
        :class:`DwellEvent`; ``hall``/``terminal`` are ``""`` without an open session.
        """
        act: dict[str, Any] = {}
        if self.event_fields:
            ev: dict[str, Any] = {}
            for name in self.event_fields:
                v = getattr(event, name)
                ev[name] = v if v is not None else ({} if name == "attrs" else "")
            act["event"] = ev
        if self.profile_fields:
            act["profile"] = {n: _PROFILE_GET[n](profile) for n in self.profile_fields}
        if self.context_fields:
            ctx: dict[str, Any] = {}
            local: datetime | None = None
            for name in self.context_fields:
                if name in ("hour", "minute", "weekday"):
                    if local is None:
                        local = datetime.fromtimestamp(ts / 1000, tz=self.tz)
                    ctx[name] = (local.hour if name == "hour" else
                                 local.minute if name == "minute" else local.isoweekday())
                else:
                    ctx[name] = {"rule": self.rule_id, "rule_version": self.rule_version,
                                 "hall": hall, "terminal": terminal, "module": module,
                                 "ts": ts}[name]
            act["context"] = ctx
        for var, name, keys in self.narrow:
            whole = act[var][name]
            act[var][name] = {k: whole[k] for k in keys if k in whole}
        try:
            result = self.program.execute(act)
        except Exception as exc:  # every CEL runtime failure means "does not hold"
            raise ConditionError(type(exc).__name__) from None
        if result is True or result is False:
            return result
        raise ConditionError(f"result is {type(result).__name__}, not bool")


def _recompile(
    source: str, kind: str, rule_id: str, version: int, timezone: str,
    limits: tuple[int, int, int, int],
) -> Condition:
    return compile_condition(source, kind, rule_id, version, timezone, *limits)


def compile_condition(
    source: str,
    trigger_kind: str,
    rule_id: str,
    rule_version: int,
    timezone: str,
    max_chars: int,
    max_depth: int,
    max_nodes: int,
    max_loops: int,
) -> Condition:
    """Check and compile a ``when`` expression for a rule with this trigger kind.

    Raises :class:`CelError` (a ``ValueError``; the message starts with ``when:``) for
    a syntax error, an unknown variable, field or function, a type error, a result that
    is not a bool, or an expression beyond the limits (``max_chars`` characters, AST
    depth ``max_depth``, ``max_nodes`` nodes, ``max_loops`` nested macros).
    """
    if trigger_kind not in CONDITION_TRIGGERS:
        raise CelError(f"when: not supported for trigger {trigger_kind} (it concerns many "
                       "customers at once, not one customer's event)")
    if len(source) > max_chars:
        raise CelError(f"when: too complex: {len(source)} characters, more than the limit "
                       f"of {max_chars}")
    if not source.strip():
        raise CelError("when: empty expression")
    tree = _Parser(source, max_depth, max_nodes).parse()
    checker = _Checker(trigger_kind, max_loops)
    result = checker.value(tree)
    if result.name not in ("bool", "dyn"):
        raise CelError(f"when: the expression is a {result}, not a bool")
    try:
        program = _compile_program(source)
    except Exception as exc:  # the Rust parser disagreed with ours: report its words
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CelError(f"when: syntax error: {first}") from None
    calls = set(program.functions())
    if not calls <= ALLOWED_FUNCTIONS:
        raise CelError("when: uses " + ", ".join(sorted(calls - ALLOWED_FUNCTIONS))
                       + ", which conditions do not support")
    for lit in checker.regexes:
        try:
            _compile_program(f'"".matches({lit.var})').execute({})
        except Exception:
            raise CelError(f"when: not a valid regular expression: {lit.var} (at column "
                           f"{lit.pos + 1})") from None
    used = checker.used
    narrow = tuple(
        (var, name, tuple(sorted(checker.keyed[(var, name)])))
        for (var, name), n in sorted(checker.field_uses.items())
        if n == checker.keyed_uses.get((var, name))
    )
    cond = Condition(
        source=source,
        trigger_kind=trigger_kind,
        rule_id=rule_id,
        rule_version=rule_version,
        timezone=timezone,
        event_fields=tuple(sorted(used["event"])),
        profile_fields=tuple(sorted(used["profile"])),
        context_fields=tuple(sorted(used["context"])),
        narrow=narrow,
        limits=(max_chars, max_depth, max_nodes, max_loops),
        program=program,
        tz=ZoneInfo(timezone),
    )
    return cond
