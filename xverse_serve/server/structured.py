"""What a chat request asks of its answer's form: JSON (response_format) or tool calls (tools, tool_choice), as the
grammar the engine constrains it with, checked here so that a grammar that cannot compile gets a 400."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from ..model.chat_format import FunctionSpec
from .errors import APIError
from .protocol import ChatCompletionRequest
from .tool_calls import grammar_error, json_grammar, tool_grammar

NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}


@dataclass(frozen=True)
class AnswerForm:
    grammar: str | None  # what every token of the answer must follow; None: free text
    tools: tuple[FunctionSpec, ...]  # the functions the prompt describes: the model may call them
    parses_calls: bool  # whether the answer is read for tool calls


FREE_TEXT = AnswerForm(None, (), False)


@functools.lru_cache(maxsize=256)
def checked_grammar_error(grammar: str) -> str | None:
    """grammar_error, once per grammar text: applications send the same schemas again and again."""
    return grammar_error(grammar)


def warm_up() -> None:
    """Builds and checks one schema's grammar, so that the first request with a schema pays no one-time costs."""
    checked_grammar_error(json_grammar(None))


def answer_form(body: ChatCompletionRequest, structured_outputs: bool) -> AnswerForm:
    """The answer's form; an APIError (400) for a schema or a function the grammar engine cannot compile, or for
    any of them where the engine has no grammars (`structured_outputs` False)."""
    form = _answer_form(body)
    if form.grammar is not None and not structured_outputs:
        param = "tools" if form.parses_calls else "response_format"
        raise APIError(400, f"{param}: structured outputs and tool calls are off on this server (llguidance could not "
                       "read the model's tokenizer; the server log says why): send the request without it",
                       param=param)
    return form


def _answer_form(body: ChatCompletionRequest) -> AnswerForm:
    if body.calls_tools():
        tools = tuple(FunctionSpec(tool.function.name, tool.function.description,
                                   tool.function.parameters if tool.function.parameters is not None
                                   else NO_ARGUMENTS) for tool in body.tools)
        grammar = _compiled(lambda: tool_grammar(tools, body.tool_choice_mode(), body.parallel_tool_calls), "tools")
        return AnswerForm(grammar, tools, True)
    response_format = body.response_format
    if response_format is None or response_format.type == "text":
        return FREE_TEXT
    schema = response_format.json_schema.schema_ if response_format.type == "json_schema" else None
    return AnswerForm(_compiled(lambda: json_grammar(schema), "response_format"), (), False)


def _compiled(build, param: str) -> str:
    try:
        grammar = build()
    except ValueError as exc:
        raise APIError(400, f"{param}: the schema cannot be used: {exc}", param=param) from exc
    error = checked_grammar_error(grammar)
    if error is not None:
        raise APIError(400, f"{param}: the schema cannot be compiled into a grammar: {error}", param=param)
    return grammar
