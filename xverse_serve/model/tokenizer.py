"""The tokenizer: tokenizer.json through the `tokenizers` library, special ids from config.json."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from .checkpoint import CheckpointError, ModelConfig


class Tokenizer:
    """tokenizer.json through the `tokenizers` library; special ids come from config.json."""

    def __init__(self, path: Path, config: ModelConfig) -> None:
        if not path.is_file():
            raise CheckpointError(f"{path} not found")
        self._tokenizer = HFTokenizer.from_file(str(path))
        vocab = self._tokenizer.get_vocab(with_added_tokens=True)
        self._byte_ids = frozenset(token for piece, token in vocab.items() if is_byte_piece(piece))
        self._special_ids = frozenset(token for token, added in self._tokenizer.get_added_tokens_decoder().items()
                                      if added.special)
        self.bos_token_id = config.bos_token_id
        self.eos_token_id = config.eos_token_id
        self.pad_token_id = config.pad_token_id

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def token_strings(self, ids: list[int]) -> list[str]:
        """Each id's own piece of the vocabulary (`▁` for a leading space, `<0xE6>` for a byte)."""
        return [self._tokenizer.id_to_token(token) for token in ids]

    def token_text(self, token: int) -> str:
        """A token's own text as log-probs show it: its vocabulary piece, with Metaspace's `▁` as the space it stands
        for; a byte-fallback token shows as its piece (`<0xE6>`), since its byte alone is no text."""
        return self._tokenizer.id_to_token(token).replace("\u2581", " ")

    def token_bytes(self, token: int) -> list[int]:
        """A token's bytes: the byte itself for a byte-fallback token (`<0xE6>` -> [230]), else its text's UTF-8."""
        piece = self._tokenizer.id_to_token(token)
        if is_byte_piece(piece):
            return [int(piece[3:5], 16)]
        return list(piece.replace("\u2581", " ").encode())

    def is_byte(self, token: int) -> bool:
        """Whether the token is a byte-fallback token (`<0xE6>`): one byte of a character the vocabulary lacks."""
        return token in self._byte_ids

    def is_special(self, token: int) -> bool:
        """Whether decode skips the token (begin and end of text, padding, unknown)."""
        return token in self._special_ids


def is_byte_piece(piece: str) -> bool:
    return len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">")
