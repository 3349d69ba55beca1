"""Errors as clients see them: OpenAI's error shape with the HTTP status beside it, for every refusal."""

from __future__ import annotations

import json

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException


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


def describe_validation_errors(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors():
        if error["type"] == "json_invalid":
            return f"the body is not valid JSON ({error.get('ctx', {}).get('error', 'decode error')})"
        location = [p for p in error["loc"] if p != "body"]
        if not location and error["type"] in ("model_attributes_type", "dict_type"):
            return "the body must be a JSON object, sent with Content-Type: application/json"
        field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in location).lstrip(".") or "body"
        parts.append(f"{field}: {error['msg']}")
    return "; ".join(parts)


def refusal(request: Request, status: int, message: str, error_type: str, param: str | None = None,
            headers: dict[str, str] | None = None) -> JSONResponse:
    """The error response, with the error noted in the request's record for its log line."""
    record = getattr(request.state, "record", None)
    if record is not None and record.error is None:
        record.error = message
    return JSONResponse(error_body(status, message, error_type, param), status_code=status, headers=headers)


async def api_error(request: Request, exc: APIError) -> JSONResponse:
    return refusal(request, exc.status, exc.message, exc.error_type, exc.param, exc.headers)


async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """FastAPI's own refusals (unknown path, wrong method, a body that is not UTF-8) in the same shape."""
    error_type = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    message = str(exc.detail)
    if isinstance(exc.__cause__, UnicodeDecodeError):
        message = f"the body is not valid UTF-8 ({exc.__cause__.reason} at byte {exc.__cause__.start})"
    return refusal(request, exc.status_code, message, error_type, headers=exc.headers)


async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    return refusal(request, 400, describe_validation_errors(exc), "invalid_request_error")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
