"""Tool calls and JSON answers: the llguidance grammars that constrain generation, and the parsers of the answer.

The prompt (model/chat_format.py) tells the model to answer a call as
`<tool_call>{"name": "NAME", "arguments": {...}}</tool_call>`, one call per line; the grammar holds it to
exactly that text, so the parsers here only have to find where each piece ends.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import llguidance

from ..model.chat_format import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, FunctionSpec, ToolCall, tool_call_prefix

# The tokenizer is Metaspace-based: the first token of the answer may carry a leading space that the decoder
# strips, so the grammar sees ` <tool_call>` where the client sees `<tool_call>`. Both are openings.
OPENINGS = (TOOL_CALL_OPEN, " " + TOOL_CALL_OPEN)
CALL_END = "}" + TOOL_CALL_CLOSE  # closes the call's own object, then the tag
# No free whitespace inside JSON: a model could otherwise stall forever emitting spaces.
STRICT_JSON = {"whitespace_flexible": False}


# Keywords whose value is a schema, a map of name to schema, or a list of schemas (JSON Schema 2020-12 and draft 7).
ONE_SCHEMA = ("items", "additionalItems", "additionalProperties", "unevaluatedProperties", "unevaluatedItems", "not",
              "contains", "if", "then", "else", "propertyNames")
SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems", "items")
OPEN_ENDED = ("additionalProperties", "unevaluatedProperties", "patternProperties")


def closed_objects(schema):
    """The schema with `"additionalProperties": false` in each object schema that lists properties and says
    nothing of others (as vLLM's xgrammar backend does by default). The answers still validate against the
    caller's schema; without this, a schema from a Pydantic model would let a random or rambling model add keys
    forever. Returns a copy: the caller's schema stays as it was."""
    if not isinstance(schema, dict):
        return schema
    closed = dict(schema)
    for key in ONE_SCHEMA:
        if isinstance(closed.get(key), dict):
            closed[key] = closed_objects(closed[key])
    for key in SCHEMA_MAPS:
        if isinstance(closed.get(key), dict):
            closed[key] = {name: closed_objects(value) for name, value in closed[key].items()}
    for key in SCHEMA_LISTS:
        if isinstance(closed.get(key), list):
            closed[key] = [closed_objects(value) for value in closed[key]]
    if "properties" in closed and not any(key in closed for key in OPEN_ENDED):
        closed["additionalProperties"] = False
    return closed


def tool_grammar(functions: Sequence[FunctionSpec], choice: str, parallel: bool) -> str:
    """An llguidance grammar for the answer when tools are offered.

    `choice` is "auto" (plain text or calls), "required" (calls to any of `functions`) or the name of the one
    function to call. `parallel` allows several calls, one per line. Each call's arguments follow its function's
    JSON schema. The lexeme shapes matter: llguidance's lexer is greedy and does not back off from TEXT, so the
    optional leading space lives inside OPEN and inside TEXT's exclusion rather than in a lexeme of its own."""
    allowed = [function for function in functions if choice in ("auto", "required") or function.name == choice]
    if not allowed:
        raise ValueError(f"tool_choice names {choice!r}, which is not among the functions")
    lines = ["start: TEXT | calls" if choice == "auto" else "start: calls",
             f"TEXT: /(?s:.+)/ & ~/ ?{TOOL_CALL_OPEN}(?s:.*)/",
             'calls: call ("\\n" call)*' if parallel else "calls: call",
             "call: " + " | ".join(f"call_{i}" for i in range(len(allowed)))]
    for i, function in enumerate(allowed):
        schema = {**closed_objects(function.parameters), "x-guidance": STRICT_JSON}
        # A JSON string literal is a valid lark string literal, escapes included.
        lines.append(f'call_{i}: OPEN {json.dumps(tool_call_prefix(function.name))} args_{i} "}}" CLOSE')
        lines.append(f"args_{i}: %json {json.dumps(schema)}")
    lines += [f"OPEN: / ?{TOOL_CALL_OPEN}/", f"CLOSE: {json.dumps(TOOL_CALL_CLOSE)}"]
    return llguidance.LLMatcher.grammar_from_lark("\n".join(lines) + "\n")


def json_grammar(schema: dict | None) -> str:
    """An llguidance grammar for response_format: a JSON value following `schema`, or any object for None.

    Raises ValueError when the schema is not a JSON object (llguidance's own check); a schema that is an object
    but not a valid schema shows up in `grammar_error`. A schema's own "x-guidance" options override ours."""
    schema = {"type": "object"} if schema is None else closed_objects(schema)
    return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema),
                                                         defaults=STRICT_JSON)


def grammar_error(grammar: str) -> str | None:
    """Why llguidance cannot use the grammar (an unknown type, a bad $ref, an unsatisfiable schema), or None."""
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    return messages[0] if is_error else None


@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class ToolCallDelta:
    """One piece of call `index` in OpenAI's streaming shape: the first has the id and name, the rest arguments."""
    index: int
    id: str | None
    name: str | None
    arguments: str

    def as_dict(self) -> dict:
        """The entry of `delta.tool_calls`: the first piece of a call has its id, type and name."""
        head = {"id": self.id, "type": "function"} if self.id is not None else {}
        function = {"name": self.name} if self.name is not None else {}
        return {"index": self.index, **head, "function": {**function, "arguments": self.arguments}}


StreamEvent = ContentDelta | ToolCallDelta


def new_call_id() -> str:
    """An id for a call, in OpenAI's shape: "call_" and 24 random hex digits."""
    return "call_" + secrets.token_hex(12)


def parse_tool_calls(text: str) -> list[ToolCall] | None:
    """The calls, when the whole answer (one leading space allowed) is one or more well-formed calls, one per
    line; else None. Arguments keep the text the model wrote."""
    stream = ToolCallStream()
    events = stream.feed(text) + stream.finish()
    if stream.calls and len(stream.calls) == stream.started and not any(isinstance(e, ContentDelta) for e in events):
        return stream.calls
    return None


class ToolCallStream:
    """Splits a streamed answer into content deltas and tool call deltas.

    Text that could still be the start of an opening is held; once it cannot, it and all later text are content.
    Inside a call, the arguments stream as they arrive: string, escape and bracket state tell exactly where the
    arguments object ends. Nothing is lost or repeated: the content deltas, plus the calls the tool call deltas
    stand for, are the whole text. Held text of a call cut off or malformed is released as content; arguments
    already streamed stay with their call, which `started` counts and `calls` (the finished ones) lacks."""

    def __init__(self) -> None:
        self.calls: list[ToolCall] = []
        self.started = 0  # calls whose first delta went out
        self._text = ""
        self._pos = 0  # where scanning resumes
        self._held = 0  # start of the text neither released as content nor stood for by a delta
        self._state = "opening"  # then name, arguments, close, and opening again; or content for good
        self._name = ""
        self._arguments_start = 0
        self._depth = 0
        self._in_string = False
        self._escaped = False

    @property
    def saw_tool_calls(self) -> bool:
        return bool(self.calls)

    def feed(self, delta: str) -> list[StreamEvent]:
        self._text += delta
        events: list[StreamEvent] = []
        while self._step(events):
            pass
        if self._state == "content":
            self._release(events)
        return events

    def finish(self) -> list[StreamEvent]:
        """Releases the held text (an unfinished opening, name or closing) as content."""
        events: list[StreamEvent] = []
        self._release(events)
        self._state = "content"
        return events

    def _step(self, events: list[StreamEvent]) -> bool:
        """Advances over the text as far as it can decide; False when it must wait for more (or is content)."""
        if self._state == "opening":
            openings = tuple("\n" + opening for opening in OPENINGS) if self.calls else OPENINGS
            return self._expect(openings, "name")
        if self._state == "name":
            return self._scan_name(events)
        if self._state == "arguments":
            return self._scan_arguments(events)
        if self._state == "close":
            return self._expect((CALL_END,), "opening") and self._end_call()
        return False

    def _expect(self, literals: tuple[str, ...], then: str) -> bool:
        rest = self._text[self._pos:]
        for literal in literals:
            if rest.startswith(literal):
                self._pos += len(literal)
                self._state = then
                return True
        if not any(literal.startswith(rest) for literal in literals):
            self._state = "content"
        return False

    def _scan_name(self, events: list[StreamEvent]) -> bool:
        """`{"name": "NAME", "arguments": `, whole, before the call is announced."""
        head, tail = '{"name": ', ', "arguments": '
        rest = self._text[self._pos:]
        if not rest.startswith(head + '"'):
            if not (head + '"').startswith(rest):
                self._state = "content"
            return False
        end = string_end(rest, len(head))
        if end is None or not rest.startswith(tail, end):
            if end is not None and not tail.startswith(rest[end:]):
                self._state = "content"
            return False
        try:
            self._name = json.loads(rest[len(head):end])
        except json.JSONDecodeError:
            self._state = "content"
            return False
        self._pos = self._held = self._arguments_start = self._pos + end + len(tail)
        self._depth, self._in_string, self._escaped = 0, False, False
        events.append(ToolCallDelta(self.started, new_call_id(), self._name, ""))
        self.started += 1
        self._state = "arguments"
        return True

    def _scan_arguments(self, events: list[StreamEvent]) -> bool:
        start = self._pos
        if start == len(self._text):
            return False
        if start == self._arguments_start and self._text[start] != "{":
            self._state = "content"
            return False
        end, done = len(self._text), False
        for pos in range(start, len(self._text)):
            char = self._text[pos]
            if self._in_string:
                self._escaped, self._in_string = (False, True) if self._escaped else (char == "\\", char != '"')
            elif char == '"':
                self._in_string = True
            elif char in "{[":
                self._depth += 1
            elif char in "}]":
                self._depth -= 1
                if self._depth == 0:
                    end, done = pos + 1, True
                    break
        events.append(ToolCallDelta(self.started - 1, None, None, self._text[start:end]))
        self._pos = self._held = end
        if done:
            self._state = "close"
        return done

    def _end_call(self) -> bool:
        arguments = self._text[self._arguments_start:self._held]
        try:
            is_object = isinstance(json.loads(arguments), dict)
        except json.JSONDecodeError:
            is_object = False
        if not is_object:  # streamed already, so it stays a started call; its closing and the rest are content
            self._state = "content"
            return False
        self.calls.append(ToolCall(self._name, arguments))
        self._held = self._pos
        return True

    def _release(self, events: list[StreamEvent]) -> None:
        if self._held < len(self._text):
            events.append(ContentDelta(self._text[self._held:]))
        self._held = self._pos = len(self._text)


def string_end(text: str, start: int) -> int | None:
    """The index just past the JSON string that opens (with its quote) at `start`, or None while it is open."""
    escaped = False
    for pos in range(start + 1, len(text)):
        if escaped:
            escaped = False
        elif text[pos] == "\\":
            escaped = True
        elif text[pos] == '"':
            return pos + 1
    return None
