"""Streaming text: whole characters only, spacing as a full decode gives it, stop strings cut and never leaked."""

from __future__ import annotations

import asyncio
import random

import pytest

from xverse_serve.engine.messages import SamplingParams, StepOutput
from xverse_serve.model.tokenizer import Tokenizer
from xverse_serve.server.generation import IncrementalDetokenizer, StopStringMatcher, generate_text

RARE = "鑫"  # not in the tiny vocabulary: three byte tokens <0xE9> <0x91> <0xAB>
TEXTS = [
    "Hello, who are you?",
    "Human: 你好，你是谁？\n\nAssistant: 我是元象公司开发的人工智能语言模型。",
    f"a{RARE}b {RARE}{RARE} x  y   z",
    f"{RARE} starts, then double  spaces and 1234567890",
    "def add(a, b):\n    return a + b\n",
    f"  leading spaces, a rare {RARE} and a trailing space ",
]


def stream(tokenizer: Tokenizer, ids: list[int], chunk: int = 1) -> list[str]:
    detokenizer = IncrementalDetokenizer(tokenizer)
    deltas = [detokenizer.add(ids[i:i + chunk]) for i in range(0, len(ids), chunk)]
    return deltas + [detokenizer.flush()]


def test_rare_character_is_byte_tokens(tokenizer: Tokenizer) -> None:
    byte_ids = tokenizer.encode(RARE)[-3:]
    assert [tokenizer._tokenizer.id_to_token(i) for i in byte_ids] == ["<0xE9>", "<0x91>", "<0xAB>"]


@pytest.mark.parametrize("text", TEXTS)
def test_token_by_token_deltas_join_to_the_full_decode(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    deltas = stream(tokenizer, ids)
    assert "".join(deltas) == tokenizer.decode(ids)
    assert deltas[-1] == "", "complete text leaves nothing for flush"
    for delta in deltas:
        assert "\ufffd" not in delta, f"partial character released: {deltas}"


@pytest.mark.parametrize("chunk", [2, 3, 5])
def test_deltas_in_chunks_join_to_the_full_decode(tokenizer: Tokenizer, chunk: int) -> None:
    ids = tokenizer.encode(TEXTS[2] + TEXTS[1])
    deltas = stream(tokenizer, ids, chunk)
    assert "".join(deltas) == tokenizer.decode(ids)
    assert all("\ufffd" not in delta for delta in deltas)


def test_random_token_streams_join_to_the_full_decode(tokenizer: Tokenizer) -> None:
    """Any mix of learned tokens, special tokens, whole byte-encoded characters and stray bytes (an invalid run,
    which the decoder turns into one replacement character per byte, an ASCII byte in it included)."""
    rng = random.Random(0)
    learned = [token for token in range(tokenizer._tokenizer.get_vocab_size()) if token >= 4 + 256]
    characters = [tokenizer.encode(c)[-3:] for c in (RARE, "淼")] + [tokenizer.encode("😀")[-4:]]
    stray_bytes = list(range(4, 4 + 256))
    for _ in range(300):
        ids: list[int] = []
        while len(ids) < 25:
            choice = rng.random()
            if choice < 0.25:
                ids += rng.choice(characters)
            elif choice < 0.35:
                ids.append(rng.choice(stray_bytes))
            else:
                ids.append(rng.choice(learned + [1, 2, 3]))
        deltas = stream(tokenizer, ids)
        assert "".join(deltas) == tokenizer.decode(ids), ids


def test_an_ascii_byte_before_a_stray_byte_reads_as_the_whole_decode_reads_it(tokenizer: Tokenizer) -> None:
    """<0x4E> alone is "N", but beside a stray lead byte the decoder reads the run as invalid: both bytes become
    replacement characters, in the whole answer and so in the stream (the case an lm-eval run found)."""
    ids = [4 + 0x4E, 4 + 0xCC] + tokenizer.encode("you")
    assert tokenizer.decode(ids).startswith("\ufffd\ufffd")
    assert "".join(stream(tokenizer, ids)) == tokenizer.decode(ids)
    # A special token between two bytes does not end their run: decode skips it.
    ids = tokenizer.encode("(") + [4 + 0x00, tokenizer.bos_token_id, 4 + 0xD1]
    assert tokenizer.decode(ids).endswith("\ufffd\ufffd")
    assert "".join(stream(tokenizer, ids)) == tokenizer.decode(ids)


def test_a_multi_byte_character_is_released_once_a_token_after_its_bytes_arrives(tokenizer: Tokenizer) -> None:
    """Its bytes are held while more bytes could follow (the decoder reads a run of them as one byte string), then
    released whole with the next token's text, or at the end."""
    ids = tokenizer.encode(f"ab {RARE}")
    detokenizer = IncrementalDetokenizer(tokenizer)
    released = [detokenizer.add([token]) for token in ids]
    assert released[-3:] == ["", "", ""]
    after = tokenizer.encode(" the")  # learned tokens, no byte among them
    with_next = detokenizer.add(after)
    assert with_next.startswith(RARE)
    assert "".join(released) + with_next == tokenizer.decode(ids + after)
    assert "".join(stream(tokenizer, ids)) == f"ab {RARE}"  # at the end, flush releases it


def test_spaces_between_tokens_are_kept(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("the  sea   and the sky")
    assert "".join(stream(tokenizer, ids)) == "the  sea   and the sky"


def test_end_of_text_adds_no_text(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("Hello") + [tokenizer.eos_token_id]
    assert "".join(stream(tokenizer, ids)) == "Hello"


def test_flush_releases_incomplete_bytes_at_the_end(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode(f"ab{RARE}")[:-1]  # the last byte never came
    detokenizer = IncrementalDetokenizer(tokenizer)
    deltas = [detokenizer.add([token]) for token in ids]
    assert "".join(deltas) == "ab"
    tail = detokenizer.flush()
    assert tail and set(tail) == {"\ufffd"}
    assert "".join(deltas) + tail == tokenizer.decode(ids)
    assert detokenizer.flush() == ""


# --- stop strings --------------------------------------------------------------------------------------


def feed_all(matcher: StopStringMatcher, pieces: list[str]) -> tuple[list[str], bool]:
    released = []
    for piece in pieces:
        text, stopped = matcher.feed(piece)
        released.append(text)
        if stopped:
            return released, True
    released.append(matcher.flush())
    return released, False


def test_partial_stop_prefix_is_held_back_until_it_resolves() -> None:
    matcher = StopStringMatcher(("world",))
    assert matcher.feed("Hello wor") == ("Hello ", False)
    assert matcher.feed("ld, again") == ("", True)


def test_held_back_prefix_is_released_when_it_turns_out_not_to_be_the_stop() -> None:
    matcher = StopStringMatcher(("world",))
    assert matcher.feed("a wo") == ("a ", False)
    assert matcher.feed("nderful") == ("wonderful", False)
    assert matcher.flush() == ""


def test_text_before_the_stop_in_the_same_piece_is_released() -> None:
    matcher = StopStringMatcher(("STOP",))
    assert matcher.feed("one two STOP three") == ("one two ", True)


@pytest.mark.parametrize("stops", [("cat", "dog"), ("dog", "cat")])
def test_cut_at_the_earliest_of_several_stops(stops: tuple[str, ...]) -> None:
    assert StopStringMatcher(stops).feed("a dog and a cat") == ("a ", True)
    assert StopStringMatcher(stops).feed("a cat and a dog") == ("a ", True)


def test_earliest_start_wins_even_for_a_longer_stop() -> None:
    assert StopStringMatcher(("abc", "b")).feed("xxabcd") == ("xx", True)


def test_stop_split_across_many_feeds_never_leaks() -> None:
    matcher = StopStringMatcher(("\n\nHuman:",))
    pieces = ["Sure", ".", "\n", "\n", "Hu", "m", "an", ":", " more"]
    released, stopped = feed_all(matcher, pieces)
    assert stopped
    assert "".join(released) == "Sure."


def test_holds_back_the_longest_partial_among_several_stops() -> None:
    matcher = StopStringMatcher(("xyz", "abcd"))
    assert matcher.feed("12abc") == ("12", False)
    assert matcher.feed("x") == ("abc", False)  # "abcx" rules out "abcd"; "x" may still begin "xyz"
    assert matcher.feed("y!") == ("xy!", False)


def test_no_stop_releases_everything() -> None:
    pieces = ["Hello", ", ", "wor", "ld", "!"]
    released, stopped = feed_all(StopStringMatcher(("never",)), pieces)
    assert not stopped
    assert "".join(released) == "Hello, world!"
    released, stopped = feed_all(StopStringMatcher(()), pieces)
    assert released[:-1] == pieces and not stopped


def test_flush_releases_a_held_back_prefix_at_the_end() -> None:
    matcher = StopStringMatcher(("</s>",))
    assert matcher.feed("answer </") == ("answer ", False)
    assert matcher.flush() == "</"


def test_stop_strings_in_chinese() -> None:
    matcher = StopStringMatcher(("。",))
    released, stopped = feed_all(matcher, ["我是", "元象", "。", "还有"])
    assert stopped and "".join(released) == "我是元象"


class ScriptedEngine:
    """Stands in for EngineClient: yields the given token chunks as one request's outputs."""

    def __init__(self, chunks: list[list[int]]) -> None:
        self.chunks = chunks

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                       shares_prompt_with: str | None = None):
        for index, chunk in enumerate(self.chunks):
            yield StepOutput(request_id, chunk, "length" if index == len(self.chunks) - 1 else None)


def answer_text(tokenizer: Tokenizer, chunks: list[list[int]]) -> str:
    async def collect() -> str:
        deltas = generate_text(ScriptedEngine(chunks), tokenizer, "r", [1], SamplingParams(max_tokens=100))
        return "".join([delta.text async for delta in deltas])

    return asyncio.run(collect())


def test_tokens_that_arrive_merged_give_the_text_they_give_one_by_one(tokenizer: Tokenizer) -> None:
    """A busy consumer gets several tokens in one output; even invalid byte runs (which a random model
    produces) must then read as they do token by token, or an answer would depend on timing."""
    rng = random.Random(2)
    learned = [token for token in range(tokenizer._tokenizer.get_vocab_size()) if token >= 4 + 256]
    single_bytes = [token for character in (RARE, "淼", "😀") for token in tokenizer.encode(character)[-3:]]
    for _ in range(60):
        ids = [rng.choice(single_bytes) if rng.random() < 0.4 else rng.choice(learned) for _ in range(20)]
        one_by_one = answer_text(tokenizer, [[token] for token in ids])
        cuts = sorted(rng.sample(range(1, len(ids)), 5))
        merged = [ids[start:end] for start, end in zip([0, *cuts], [*cuts, len(ids)])]
        assert answer_text(tokenizer, merged) == one_by_one == tokenizer.decode(ids)
