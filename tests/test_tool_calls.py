"""Tool calling: the grammars hold random walks over the tiny tokenizer to the call format and the schemas, and
the parsers split answers into content and calls, whole or streamed in any chunks."""

from __future__ import annotations

import copy
import json
import random

import jsonschema
import llguidance
import llguidance.torch
import pytest
import torch
from tiny_checkpoint import build_tokenizer
from tokenizers import Tokenizer as HFTokenizer

from xverse_serve.model.chat_format import FunctionSpec, ToolCall
from xverse_serve.server.tool_calls import (
    ContentDelta,
    ToolCallDelta,
    ToolCallStream,
    closed_objects,
    grammar_error,
    json_grammar,
    parse_tool_calls,
    tool_grammar,
)

EOS = 3
MAX_STEPS = 300
SEEDS = range(8)

# Bounded fields, so that random walks end within MAX_STEPS.
WEATHER = FunctionSpec("get_weather", "The weather in a city now", {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False,
})
ADD = FunctionSpec("add", None, {
    "type": "object",
    "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                   "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 2}},
    "required": ["a"], "additionalProperties": False,
})
ODD_NAME = FunctionSpec('say "hi"\\天', None, {"type": "object", "properties": {"n": {"type": "boolean"}},
                                              "required": ["n"], "additionalProperties": False})
FUNCTIONS = [WEATHER, ADD, ODD_NAME]
SCHEMAS = {function.name: function.parameters for function in FUNCTIONS}


@pytest.fixture(scope="module")
def hf_tokenizer() -> HFTokenizer:
    return build_tokenizer()


@pytest.fixture(scope="module")
def lltok(hf_tokenizer: HFTokenizer) -> llguidance.LLTokenizer:
    return llguidance.LLTokenizer(hf_tokenizer.to_str(), n_vocab=hf_tokenizer.get_vocab_size(), eos_token=EOS)


def allowed_tokens(mask: torch.Tensor, vocab_size: int) -> list[int]:
    bits = (mask[0].unsqueeze(1) >> torch.arange(32, dtype=torch.int32)) & 1
    return bits.flatten()[:vocab_size].nonzero().flatten().tolist()


def walk(lltok: llguidance.LLTokenizer, hf_tokenizer: HFTokenizer, grammar: str, seed: int,
         forced: str = "") -> str | None:
    """Decoded text of a random walk through the grammar (after the tokens of `forced`); None if it did not end.
    End of text, where allowed, is taken with probability 1/2, else it would rarely be picked from 400 tokens."""
    matcher = llguidance.LLMatcher(lltok, grammar, log_level=0)
    ids = lltok.tokenize_str(forced)
    assert matcher.try_consume_tokens(ids) == len(ids), matcher.get_error()
    mask = llguidance.torch.allocate_token_bitmask(1, lltok.vocab_size)
    rng = random.Random(seed)
    for _ in range(MAX_STEPS):
        llguidance.torch.fill_next_token_bitmask(matcher, mask, 0)
        allowed = allowed_tokens(mask, lltok.vocab_size)
        others = [t for t in allowed if t != EOS]
        token = EOS if EOS in allowed and (not others or rng.random() < 0.5) else rng.choice(others)
        assert matcher.consume_token(token), matcher.get_error()
        if token == EOS:
            return hf_tokenizer.decode(ids, skip_special_tokens=True)
        ids.append(token)
    return None


def finished_walks(lltok, hf_tokenizer, grammar: str, forced: str = "") -> list[str]:
    texts = [walk(lltok, hf_tokenizer, grammar, seed, forced) for seed in SEEDS]
    ended = [text for text in texts if text is not None]
    assert len(ended) >= len(texts) * 3 // 4, f"only {len(ended)} of {len(texts)} walks ended"
    return ended


def assert_valid_calls(text: str, names: set[str], parallel: bool) -> list[ToolCall]:
    calls = parse_tool_calls(text)
    assert calls, f"not tool calls: {text!r}"
    assert parallel or len(calls) == 1
    for call in calls:
        assert call.name in names
        jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
    return calls


# --- the tool grammar ----------------------------------------------------------------------------------


@pytest.mark.parametrize("parallel", [False, True])
def test_required_gives_calls_to_any_function_following_its_schema(lltok, hf_tokenizer, parallel: bool) -> None:
    grammar = tool_grammar(FUNCTIONS, "required", parallel)
    assert grammar_error(grammar) is None
    for text in finished_walks(lltok, hf_tokenizer, grammar):
        assert_valid_calls(text, set(SCHEMAS), parallel)


@pytest.mark.parametrize("function", FUNCTIONS, ids=lambda function: function.name)
def test_a_named_function_is_the_only_one_called(lltok, hf_tokenizer, function: FunctionSpec) -> None:
    grammar = tool_grammar(FUNCTIONS, function.name, parallel=True)
    for text in finished_walks(lltok, hf_tokenizer, grammar):
        assert_valid_calls(text, {function.name}, parallel=True)


def test_auto_gives_plain_text_or_calls(lltok, hf_tokenizer) -> None:
    grammar = tool_grammar(FUNCTIONS, "auto", parallel=True)
    for text in finished_walks(lltok, hf_tokenizer, grammar):
        if text.removeprefix(" ").startswith("<tool_call>"):
            assert_valid_calls(text, set(SCHEMAS), parallel=True)
        else:
            assert parse_tool_calls(text) is None
    for forced in ("<tool_call>", " <tool_call>"):  # random text rarely opens a call: open one, walk the rest
        for text in finished_walks(lltok, hf_tokenizer, grammar, forced):
            assert_valid_calls(text, set(SCHEMAS), parallel=True)


def accepts(lltok: llguidance.LLTokenizer, grammar: str, text: str) -> bool:
    """Whether the grammar takes the text as a whole answer."""
    matcher = llguidance.LLMatcher(lltok, grammar, log_level=0)
    ids = lltok.tokenize_str(text)
    return matcher.try_consume_tokens(ids) == len(ids) and matcher.is_accepting()


def test_auto_text_cannot_start_with_the_opening_tag_unless_it_is_a_call(lltok) -> None:
    grammar = tool_grammar(FUNCTIONS, "auto", parallel=False)
    for text, accepted in [("<tool_call>xx", False), (" <tool_call>xx", False), ("<toolbox> is a word", True),
                           ("Use <tool_call>xx later", True),
                           ('<tool_call>{"name": "add", "arguments": {"a":1}}</tool_call>', True)]:
        matcher = llguidance.LLMatcher(lltok, grammar, log_level=0)
        ids = lltok.tokenize_str(text)
        assert (matcher.try_consume_tokens(ids) == len(ids)) == accepted, text


def test_the_grammar_holds_the_exact_call_format_without_free_whitespace(lltok) -> None:
    grammar = tool_grammar([ADD], "required", parallel=False)
    for text, accepted in [('<tool_call>{"name": "add", "arguments": {"a":1}}</tool_call>', True),
                           ('<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>', False),
                           ('<tool_call>{"name":"add", "arguments": {"a":1}}</tool_call>', False),
                           ('<tool_call>{"name": "add", "arguments": {"a":100}}</tool_call>', False),
                           ('<tool_call>{"name": "get_weather", "arguments": {}}</tool_call>', False)]:
        assert accepts(lltok, grammar, text) == accepted, text


def test_without_parallel_one_call_ends_the_answer(lltok) -> None:
    call = '<tool_call>{"name": "add", "arguments": {"a":1}}</tool_call>'
    for parallel in (False, True):
        assert accepts(lltok, tool_grammar([ADD], "required", parallel), f"{call}\n{call}") == parallel


def test_tool_grammar_leaves_the_schemas_as_they_were() -> None:
    before = copy.deepcopy(FUNCTIONS)
    tool_grammar(FUNCTIONS, "auto", parallel=True)
    assert FUNCTIONS == before and all("x-guidance" not in function.parameters for function in FUNCTIONS)


def test_an_invalid_parameters_schema_is_a_grammar_error() -> None:
    broken = FunctionSpec("f", None, {"type": "object", "properties": {"a": {"type": "strin"}}})
    assert "strin" in grammar_error(tool_grammar([broken], "required", parallel=False))


# --- the JSON grammar ----------------------------------------------------------------------------------


@pytest.mark.parametrize("schema", [ADD.parameters, WEATHER.parameters], ids=["add", "weather"])
def test_json_grammar_walks_are_json_following_the_schema(lltok, hf_tokenizer, schema: dict) -> None:
    grammar = json_grammar(schema)
    assert grammar_error(grammar) is None
    for text in finished_walks(lltok, hf_tokenizer, grammar):
        jsonschema.validate(json.loads(text), schema)


def test_json_grammar_without_a_schema_takes_any_object_and_nothing_else(lltok) -> None:
    grammar = json_grammar(None)
    assert grammar_error(grammar) is None
    assert accepts(lltok, grammar, '{"a":1,"b":[true,null],"c":{"d":"x"}}')
    assert not accepts(lltok, grammar, "[1,2]")
    assert not accepts(lltok, grammar, '"text"')


def test_json_grammar_allows_no_free_whitespace_unless_the_schema_says_so(lltok) -> None:
    spaced = lltok.tokenize_str('{ "a": 1 }')
    strict = llguidance.LLMatcher(lltok, json_grammar(None), log_level=0)
    assert strict.try_consume_tokens(spaced) < len(spaced)
    own_options = {"type": "object", "x-guidance": {"whitespace_flexible": True}}
    flexible = llguidance.LLMatcher(lltok, json_grammar(own_options), log_level=0)
    assert flexible.try_consume_tokens(spaced) == len(spaced)


@pytest.mark.parametrize("schema, problem", [
    ({"type": "object", "properties": {"a": {"type": "strin"}}}, "Invalid type: strin"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, "/$defs/missing"),
    ({"type": "integer", "minimum": 5, "maximum": 1}, "minimum"),
])
def test_grammar_error_names_the_problem_of_an_invalid_schema(schema: dict, problem: str) -> None:
    assert problem in grammar_error(json_grammar(schema))


def test_a_schema_that_is_not_an_object_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        json_grammar([{"type": "object"}])  # type: ignore[arg-type]


# --- parsing -------------------------------------------------------------------------------------------

WEATHER_CALL = '<tool_call>{"name": "get_weather", "arguments": {"city":"Paris","unit":"celsius"}}</tool_call>'
ADD_CALL = '<tool_call>{"name": "add", "arguments": {"a":1}}</tool_call>'
TRICKY_ARGUMENTS = '{"s":"a}b</tool_call>\\"}}","t":{"u":["]",{"v":"\\\\"}]}}'
ODD_NAME_PREFIX = '{"name": "say \\"hi\\"\\\\天", "arguments": '

# text, the content it holds, the calls started as (name, arguments streamed), how many of them finished
CASES = {
    "plain text": ("It is sunny in Paris.", "It is sunny in Paris.", [], 0),
    "one call": (WEATHER_CALL, "", [("get_weather", '{"city":"Paris","unit":"celsius"}')], 1),
    "two calls": (f"{WEATHER_CALL}\n{ADD_CALL}", "",
                  [("get_weather", '{"city":"Paris","unit":"celsius"}'), ("add", '{"a":1}')], 2),
    "leading space": (f" {ADD_CALL}\n {ADD_CALL}", "", [("add", '{"a":1}'), ("add", '{"a":1}')], 2),
    "diverges from the tag": ("<toolbox> is a word", "<toolbox> is a word", [], 0),
    "tag later in text": ("Write <tool_call> to call", "Write <tool_call> to call", [], 0),
    "braces and tags in strings": (f'<tool_call>{{"name": "add", "arguments": {TRICKY_ARGUMENTS}}}</tool_call>', "",
                                   [("add", TRICKY_ARGUMENTS)], 1),
    "escaped name": (f'<tool_call>{ODD_NAME_PREFIX}{{"n":true}}}}</tool_call>', "",
                     [('say "hi"\\天', '{"n":true}')], 1),
    "cut in the arguments": ('<tool_call>{"name": "add", "arguments": {"a":1,"tags":["x', "",
                             [("add", '{"a":1,"tags":["x')], 0),
    "cut in the name": ('<tool_call>{"name": "get_wea', '<tool_call>{"name": "get_wea', [], 0),
    "cut in the closing": ('<tool_call>{"name": "add", "arguments": {"a":1}}</tool', "}</tool",
                           [("add", '{"a":1}')], 0),
    "text after a call": (f"{ADD_CALL}\nDone.", "\nDone.", [("add", '{"a":1}')], 1),
    "newline after a call": (f"{ADD_CALL}\n", "\n", [("add", '{"a":1}')], 1),
    "arguments not an object": ('<tool_call>{"name": "add", "arguments": [1]}</tool_call>',
                                "[1]}</tool_call>", [("add", "")], 0),
    "no arguments key": ('<tool_call>{"name": "add", "args": {}}</tool_call>',
                         '<tool_call>{"name": "add", "args": {}}</tool_call>', [], 0),
}
PARSED = {"one call", "two calls", "leading space", "braces and tags in strings", "escaped name"}


@pytest.mark.parametrize("case", CASES)
def test_parse_tool_calls_takes_only_answers_that_are_all_calls(case: str) -> None:
    text, _, started, _ = CASES[case]
    expected = [ToolCall(name, arguments) for name, arguments in started] if case in PARSED else None
    assert parse_tool_calls(text) == expected


def chunkings(text: str) -> list[list[str]]:
    """The text whole, char by char, and in random pieces."""
    rng = random.Random(0)
    splits = [[text], list(text)]
    for _ in range(30):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 8)))) if len(text) > 1 else []
        splits.append([text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])])
    return splits


@pytest.mark.parametrize("case", CASES)
def test_stream_accounts_for_all_the_text_in_any_chunking(case: str) -> None:
    text, content, started, finished = CASES[case]
    for pieces in chunkings(text):
        stream = ToolCallStream()
        events = [event for piece in pieces for event in stream.feed(piece)] + stream.finish()
        assert "".join(event.text for event in events if isinstance(event, ContentDelta)) == content
        deltas = [event for event in events if isinstance(event, ToolCallDelta)]
        firsts = [delta for delta in deltas if delta.id is not None]
        assert [(delta.index, delta.name, delta.arguments) for delta in firsts] == \
            [(index, name, "") for index, (name, _) in enumerate(started)]
        assert all(delta.id.startswith("call_") and len(delta.id) == 29 for delta in firsts)
        assert len({delta.id for delta in firsts}) == len(firsts)
        for index, (_, arguments) in enumerate(started):
            pieces_of_call = [delta for delta in deltas if delta.index == index]
            assert pieces_of_call[0].id is not None and all(d.id is None and d.name is None for d in pieces_of_call[1:])
            assert "".join(delta.arguments for delta in pieces_of_call) == arguments
        assert stream.calls == [ToolCall(name, arguments) for name, arguments in started[:finished]]
        assert stream.saw_tool_calls == (finished > 0)


def test_stream_holds_a_possible_opening_and_releases_plain_text_at_once() -> None:
    stream = ToolCallStream()
    assert stream.feed(" <tool") == []
    assert stream.feed("box>") == [ContentDelta(" <toolbox>")]
    assert stream.feed(" and more") == [ContentDelta(" and more")]


def test_stream_announces_a_call_when_its_name_is_complete_then_streams_arguments() -> None:
    stream = ToolCallStream()
    assert stream.feed('<tool_call>{"name": "add", "arguments"') == []
    [first] = stream.feed(": ")
    assert (first.index, first.name, first.arguments) == (0, "add", "")
    assert stream.feed('{"a":') == [ToolCallDelta(0, None, None, '{"a":')]
    assert stream.feed("1}") == [ToolCallDelta(0, None, None, "1}")]
    assert stream.feed("}</tool_call>") == [] and stream.calls == [ToolCall("add", '{"a":1}')]
    assert stream.finish() == []


def test_closed_objects_closes_object_schemas_that_list_properties_and_say_nothing_of_others() -> None:
    schema = {
        "type": "object",
        "properties": {"properties": {"type": "object", "properties": {"x": {"type": "integer"}}},
                       "free": {"type": "object", "properties": {}, "additionalProperties": {"type": "string"}},
                       "items": {"type": "array", "items": {"$ref": "#/$defs/point"}},
                       "either": {"anyOf": [{"type": "object", "properties": {"a": {"type": "null"}}},
                                            {"type": "string"}]}},
        "$defs": {"point": {"type": "object", "properties": {"x": {"type": "number"}}}},
    }
    original = json.dumps(schema)
    closed = closed_objects(schema)
    assert json.dumps(schema) == original  # the caller's schema is untouched
    assert closed["additionalProperties"] is False
    # a property named "properties" is a property, not the keyword: its schema is closed, the map is not touched
    assert set(closed["properties"]) == {"properties", "free", "items", "either"}
    assert closed["properties"]["properties"]["additionalProperties"] is False
    assert closed["properties"]["free"]["additionalProperties"] == {"type": "string"}
    assert closed["$defs"]["point"]["additionalProperties"] is False
    assert closed["properties"]["either"]["anyOf"][0]["additionalProperties"] is False
    assert closed["properties"]["either"]["anyOf"][1] == {"type": "string"}
    assert closed_objects({"type": "object"}) == {"type": "object"}  # no properties listed: any object


def test_a_schema_without_additional_properties_gets_no_keys_beyond_its_own(lltok) -> None:
    """A Pydantic model's schema says nothing of other keys: the grammar takes none after the listed ones."""
    grammar = json_grammar({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]})
    assert accepts(lltok, grammar, '{"a":1}')
    assert not accepts(lltok, grammar, '{"a":1,"b":2}')
