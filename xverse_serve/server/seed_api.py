"""POST / — the seed recipe's API: {"prompt": ...} -> {"response", "status", "time"}, with optional history."""

from __future__ import annotations

import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Request

from .auth import require_api_key
from .protocol import ChatMessage, SeedRequest
from .service import GenerationService, get_service

router = APIRouter(dependencies=[Depends(require_api_key)])


@router.post("/")
async def seed_chat(body: SeedRequest, request: Request,
                    service: Annotated[GenerationService, Depends(get_service)]) -> dict:
    service.check_capacity()
    messages = [*body.history, ChatMessage(role="user", content=body.prompt)]
    prompt_ids, max_tokens = service.chat_prompt(messages, body.max_new_tokens, "max_new_tokens")
    service.start(request, prompt_ids, lambda: body.prompt)
    result = await service.complete(request, prompt_ids, service.sampling_params(body, max_tokens))
    time_text = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    if service.log_prompts:  # the seed's own log line, which holds the text
        print(f'[{time_text}] ", prompt:"{body.prompt}", response:"{result.text!r}"', flush=True)
    return {"response": result.text, "status": 200, "time": time_text}
