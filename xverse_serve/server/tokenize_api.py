"""POST /tokenize and POST /detokenize, in vLLM's shapes: a prompt or chat messages to token ids (as the model
sees them, in XVERSE's chat format for messages), and token ids back to text."""

from __future__ import annotations

import sys
from typing import Annotated

from fastapi import APIRouter, Depends

from ..model.chat_format import PromptError, encode_chat
from .auth import require_api_key
from .errors import APIError
from .protocol import DetokenizeRequest, TokenizeRequest, to_messages
from .service import GenerationService, get_service

router = APIRouter(dependencies=[Depends(require_api_key)])
Service = Annotated[GenerationService, Depends(get_service)]


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, service: Service) -> dict:
    """{"prompt": text} encodes the text as /v1/completions does; {"messages": [...]} as /v1/chat/completions
    does, the live turn's `Assistant: ` included (XVERSE's format always ends with it), without truncation."""
    service.check_model(body.model)
    ctx = service.ctx
    if body.prompt is not None:
        tokens = ctx.tokenizer.encode(body.prompt)
    else:
        try:
            tokens = encode_chat(ctx.tokenizer, to_messages(body.messages), limit=sys.maxsize)
        except PromptError as exc:
            raise APIError(400, str(exc), param="messages") from exc
    result = {"count": len(tokens), "max_model_len": ctx.max_model_len, "tokens": tokens}
    if body.return_token_strs:
        result["token_strs"] = ctx.tokenizer.token_strings(tokens)
    return result


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, service: Service) -> dict:
    service.check_model(body.model)
    vocab = service.ctx.model_config.vocab_size
    outside = [token for token in body.tokens if not 0 <= token < vocab]
    if outside:
        raise APIError(400, f"tokens holds {outside[0]}, outside the vocabulary (0 to {vocab - 1})", param="tokens")
    return {"prompt": service.ctx.tokenizer.decode(body.tokens)}
