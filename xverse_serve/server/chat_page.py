"""GET /chat: a chat page for the browser that talks to this server's own /v1/chat/completions.

The page, its script and its style sheet are files in `static/` beside this module. It holds no secret, so it
is served without an API key; the key, where the server needs one, is typed into the page and sent by it."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

STATIC = Path(__file__).parent / "static"
ASSETS = {"chat.js": "text/javascript", "chat.css": "text/css"}
# Everything the page loads or calls is on this server; the browser refuses anything else.
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                           "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

router = APIRouter(include_in_schema=False)


@router.get("/chat")
async def chat_page() -> FileResponse:
    return FileResponse(STATIC / "chat.html", media_type="text/html",
                        headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY})


@router.get("/chat/{name}")
async def chat_asset(name: str) -> FileResponse:
    if name not in ASSETS:
        raise HTTPException(404, f"no file {name!r} belongs to the chat page")
    return FileResponse(STATIC / name, media_type=ASSETS[name])
