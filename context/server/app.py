"""The FastAPI application: routes, Bearer auth, and every error in OpenAI's shape."""

from __future__ import annotations

import hmac
import logging
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import chat, conversations, responses
from .errors import APIError, not_found, translate
from .schemas import ChatCompletionRequest, ConversationCreate, ConversationUpdate, ItemsCreate, ResponseRequest
from .state import ServerState

log = logging.getLogger("chatcore.serve")
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _error(exc: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


def _param(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or None


def create_app(state: ServerState) -> FastAPI:
    """The server's app on `state` (engine, store, config)."""

    async def auth(request: Request) -> None:
        key = state.config.api_key
        if key is None:
            return
        got = request.headers.get("authorization", "")
        scheme, _, token = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise APIError(401, "missing or wrong API key: send it as 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    app = FastAPI(title="chatcore serve", dependencies=[Depends(auth)], docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.chatcore = state

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return _error(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        first = errs[0] if errs else {}
        loc = tuple(first.get("loc", ()))
        what = _param(loc)
        msg = first.get("msg", "invalid request body")
        if first.get("type") == "json_invalid":
            msg, what = "the request body is not valid JSON", None
        text = f"{what}: {msg}" if what else msg
        return _error(APIError(400, text, param=what, code="invalid_request"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return _error(APIError(exc.status_code, str(exc.detail), code=code))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        err = translate(exc)
        if err.status >= 500:
            log.exception("chatcore serve: request failed", exc_info=exc)
        return _error(err)

    # -- models ------------------------------------------------------------------------------------------
    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [_model(state)]}

    @app.get("/v1/models/{model}")
    async def get_model(model: str) -> dict[str, Any]:
        state.check_model(model)
        return _model(state)

    # -- chat completions ----------------------------------------------------------------------------------
    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(req: ChatCompletionRequest) -> Any:
        job = chat.prepare(state, req)
        if job.stream:
            return StreamingResponse(chat.stream(state, job), media_type="text/event-stream", headers=_SSE_HEADERS)
        return await chat.complete(state, job)

    # -- responses -------------------------------------------------------------------------------------------
    @app.post("/v1/responses", response_model=None)
    async def create_response(req: ResponseRequest) -> Any:
        job = responses.prepare(state, req)
        if not job.stream:
            return await responses.complete(state, job)
        pump, items, started = await responses.start(state, job)
        return StreamingResponse(responses.stream(state, job, pump, items, started), media_type="text/event-stream",
                                 headers=_SSE_HEADERS)

    @app.get("/v1/responses/{response_id}")
    def get_response(response_id: str) -> dict[str, Any]:
        return responses.stored_response(state, _id(response_id, "response_id"))

    @app.get("/v1/responses/{response_id}/input_items")
    def get_input_items(response_id: str) -> dict[str, Any]:
        from .items import item_list

        return item_list(responses.input_item_list(state, _id(response_id, "response_id")))

    @app.delete("/v1/responses/{response_id}")
    def delete_response(response_id: str) -> dict[str, Any]:
        if not state.store.delete_response(_id(response_id, "response_id")):
            raise not_found(f"no stored response {response_id!r}", "response_id")
        return {"id": response_id, "object": "response.deleted", "deleted": True}

    # -- conversations -----------------------------------------------------------------------------------------
    @app.post("/v1/conversations")
    def create_conversation(req: ConversationCreate | None = None) -> dict[str, Any]:
        req = req or ConversationCreate()
        return conversations.create(state, req.items, req.metadata)

    @app.get("/v1/conversations/{conversation_id}")
    def get_conversation(conversation_id: str) -> dict[str, Any]:
        return conversations.get(state, conversation_id)

    @app.post("/v1/conversations/{conversation_id}")
    def update_conversation(conversation_id: str, req: ConversationUpdate) -> dict[str, Any]:
        return conversations.update(state, conversation_id, req.metadata)

    @app.delete("/v1/conversations/{conversation_id}")
    def delete_conversation(conversation_id: str) -> dict[str, Any]:
        return conversations.delete(state, conversation_id)

    @app.get("/v1/conversations/{conversation_id}/items")
    def list_items(conversation_id: str, limit: int = 20, order: str = "desc",
                   after: str | None = None) -> dict[str, Any]:
        return conversations.list_items(state, conversation_id, limit=limit, order=order, after=after)

    @app.post("/v1/conversations/{conversation_id}/items")
    def add_items(conversation_id: str, req: ItemsCreate) -> dict[str, Any]:
        return conversations.add_items(state, conversation_id, req.items)

    @app.get("/v1/conversations/{conversation_id}/items/{item_id}")
    def get_item(conversation_id: str, item_id: str) -> dict[str, Any]:
        return conversations.get_item(state, conversation_id, item_id)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        await run_in_threadpool(state.store.ping)
        return {"status": "ok"}

    return app


def _id(value: str, param: str) -> str:
    from storage import InvalidInput
    from storage.keys import check_id

    try:
        return check_id(value, "response")
    except InvalidInput:
        raise not_found(f"no stored response {value!r}", param) from None


def _model(state: ServerState) -> dict[str, Any]:
    return {"id": state.config.model_name, "object": "model", "created": 0, "owned_by": "chatcore",
            "context_window": state.engine.window}
