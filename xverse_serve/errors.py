"""Errors as clients see them: OpenAI's error shape, with the HTTP status beside it."""

from __future__ import annotations

import json


class APIError(Exception):
    def __init__(self, status: int, message: str, error_type: str = "invalid_request_error",
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.error_type, self.param = status, message, error_type, param
        self.headers = headers


def error_body(status: int, message: str, error_type: str, param: str | None = None) -> dict:
    """OpenAI's error shape; `status` is kept beside it as the seed's clients read it."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": status}, "status": status}


async def send_error(send, status: int, message: str, error_type: str,
                     headers: list[tuple[bytes, bytes]] = ()) -> None:
    """An error response straight through ASGI, for middleware that answers before the app runs."""
    body = json.dumps(error_body(status, message, error_type)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})
