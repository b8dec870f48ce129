"""llama-cpp-python's OpenAI-compatible server (``llama_cpp.server``) with trimmed handlers.

The app is the stock one: its routes, settings, API key, locks (one request at a time on the
model) and error format. trimcpp changes three things:

- :class:`TrimLlamaProxy` loads a ``trim-*`` chat_format with the trimmed handler, configured from
  the model's settings (keep, method, image cache, KV reuse); stock formats load as before;
- ``POST /v1/chat/completions`` is :func:`create_chat_completion`: it resolves the request's images
  under the server's :class:`~trimcpp.serve.fetch.ImagePolicy` before it waits for the model, applies
  the request's ``"trimcpp"`` options, and runs the handler (for a stream, up to its first chunk)
  before it answers, so that a bad request is an HTTP 400 and not a broken stream; the answer says,
  per image, the rows the LLM saw and the image's rows (field ``trimcpp``, header
  ``x-trimcpp-image-rows``);
- a request the server cannot serve as asked (invalid body, an image refused, a prompt over
  ``n_ctx``, a bad ``keep``: any ValueError of the chat call) is HTTP 400 in OpenAI's error format;
  the stock server answers 422 or 500;
- ``POST /v1/trimcpp/preload`` (:func:`preload`) takes one image part (or the conversation so far),
  resolves it under the same policy and attaches it (``handler.attach``): encodes it into the model's
  image cache and, while the model is idle, prefills its rows, so that the request that asks about it
  later finds them ready: a client sends the picture when the user attaches it, the question when it
  is typed; ``GET`` the same path for the prefill's progress.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import contextvars
import functools
import importlib.resources
import json
import os
import time
from typing import Any, AsyncIterator, Iterator, Literal, Optional, Union

import anyio
import llama_cpp
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from llama_cpp.server import app as stock_app
from llama_cpp.server.errors import RouteErrorHandler
from llama_cpp.server.model import LlamaProxy
from llama_cpp.server.types import CreateChatCompletionRequest
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool

from ..handlers import HANDLERS
from ..handlers.mechanism import Preloaded, PreloadSuperseded, Trimming, image_parts, part_url
from ..selection import ALIGNMENTS, METHODS
from .fetch import ImagePolicy, ImageRefused, localise
from .overlay import image_overlays
from .settings import STAGE1_HELP, TRIM_FORMATS, Stage1Setting, TrimModelSettings, TrimServerSettings, handler_keep, token_limit

CHAT_PATH = "/v1/chat/completions"
PRELOAD_PATH = "/v1/trimcpp/preload"
ROWS_HEADER = "x-trimcpp-image-rows"


# Set in the routes that reach a trimmed handler (chat, preload): its background prefill is theirs
# to decide about. Any other use of the model stops it first (see TrimLlamaProxy.__call__), except
# the stock routes that only tokenise (the request's path: _PATH, set by mark_path).
_HANDLER_ROUTE: contextvars.ContextVar[bool] = contextvars.ContextVar("trimcpp_handler_route", default=False)
_PATH: contextvars.ContextVar[str] = contextvars.ContextVar("trimcpp_path", default="")
TOKENIZE_ONLY = ("/extras/tokenize", "/extras/tokenize/count", "/extras/detokenize")


class MarkPath:
    """ASGI middleware: the request's path, for TrimLlamaProxy (a context variable of the request)."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        token = _PATH.set(scope.get("path", "")) if scope["type"] == "http" else None
        try:
            await self.app(scope, receive, send)
        finally:
            if token is not None:
                _PATH.reset(token)


class TrimLlamaProxy(LlamaProxy):
    """llama-cpp-python's model proxy, which also loads the ``trim-*`` chat formats, and stops a
    background prefill (``handler.attach``) before another route uses the model (the tokenize routes
    excepted) or another model replaces it: a prefill runs only while the model is idle."""

    def __call__(self, model: Optional[str] = None) -> llama_cpp.Llama:
        handler = trimmed_handler(self._current_model) if self._current_model is not None else None
        if handler is not None:
            alias = model if model in self._model_settings_dict else self._default_model_alias
            if alias != self._current_model_alias or not (_HANDLER_ROUTE.get() or _PATH.get() in TOKENIZE_ONLY):
                handler.cancel_attach()
        return super().__call__(model)

    def free(self) -> None:
        llama = getattr(self, "_current_model", None)
        handler = trimmed_handler(llama) if llama is not None else None
        if handler is not None:
            handler.cancel_attach()
        super().free()

    def load_llama_from_model_settings(self, settings: TrimModelSettings) -> llama_cpp.Llama:  # type: ignore[override]
        stock_format = TRIM_FORMATS.get(settings.chat_format or "")
        if stock_format is None:
            llama = super().load_llama_from_model_settings(settings)
        else:
            handler = HANDLERS[stock_format][1](clip_model_path=settings.clip_model_path, verbose=settings.verbose,
                                                **settings.handler_options())
            llama = super().load_llama_from_model_settings(settings.stock())
            kwargs = settings.chat_template_kwargs
            llama.chat_handler = functools.partial(handler, **kwargs) if kwargs else handler
        handler = chat_handler(llama)
        if hasattr(handler, "load_image"):
            handler.load_image = _data_only  # the route has made every image a data: URI
        return llama


def _data_only(url: str) -> bytes:
    if not url.startswith("data:"):
        raise ImageRefused(f"image URL {url[:40]!r} was not resolved by the server")
    return base64.b64decode(url.split(",", 1)[1])


def chat_handler(llama: llama_cpp.Llama) -> Any:
    """The Llama's chat handler (inside the functools.partial that carries chat_template_kwargs)."""
    return getattr(llama.chat_handler, "func", llama.chat_handler)


def trimmed_handler(llama: llama_cpp.Llama) -> Optional[Trimming]:
    """The Llama's trimmed handler, or None for a stock chat format."""
    handler = chat_handler(llama)
    return handler if isinstance(handler, Trimming) else None


class TrimOptions(BaseModel):
    """The request's ``"trimcpp"`` field: this request's pruning, over the model's settings."""

    model_config = ConfigDict(extra="forbid")

    keep: Optional[float] = Field(default=None, ge=0, description="rows kept per image: a count, a share in (0, 1), "
                                                                  "0 for every row")
    method: Optional[str] = Field(default=None, description=f"one of {', '.join(METHODS)}",
                                  json_schema_extra=lambda schema: schema["anyOf"][0].update(enum=list(METHODS)))
    stage1_ratio: Optional[Stage1Setting] = Field(default=None, description=STAGE1_HELP)
    alignment: Optional[str] = Field(default=None, description=f"stage 1's score, one of {', '.join(ALIGNMENTS)}",
                                     json_schema_extra=lambda schema: schema["anyOf"][0].update(enum=list(ALIGNMENTS)))
    image_min_tokens: Optional[int] = token_limit("image_min_tokens", "dynamic-resolution encoders: fewest rows per "
                                                  "image (a value other than the model's reloads its mmproj)")
    image_max_tokens: Optional[int] = token_limit("image_max_tokens", "dynamic-resolution encoders: most rows per "
                                                  "image (a value other than the model's reloads its mmproj)")
    reuse_kv: Optional[Literal[False]] = Field(default=None, description="false: this request prefills its whole "
                                               "prompt, reusing nothing the KV cache holds (a picture prefilled on "
                                               "attach included), so that answers with different keeps are timed "
                                               "alike (the chat page's compare); the next request prefills anew too")
    overlay: bool = Field(default=False, exclude=True, description="also answer, per image, the picture with the "
                          "patches the LLM saw as they are and the others dimmed (the chat page's overlay)")

    @field_validator("keep")
    @classmethod
    def _keep(cls, value: Optional[float]) -> Optional[float]:
        if value is not None:
            handler_keep(value)
        return value

    @field_validator("method", "alignment")
    @classmethod
    def _known(cls, value: Optional[str], info) -> Optional[str]:
        known = METHODS if info.field_name == "method" else ALIGNMENTS
        if value is not None and value not in known:
            raise ValueError(f"unknown {info.field_name} {value!r}; expected one of {', '.join(known)}")
        return value


class TrimChatCompletionRequest(CreateChatCompletionRequest):
    trimcpp: Optional[TrimOptions] = Field(default=None, description="trimcpp: this request's pruning (trim-* models)")


def completion_kwargs(body: CreateChatCompletionRequest) -> dict[str, Any]:
    """``Llama.create_chat_completion``'s arguments for a request, as the stock server derives them
    (its sampling defaults are the request model's, e.g. ``repeat_penalty`` 1.1, not the Python API's)."""
    return body.model_dump(exclude={"n", "logit_bias_type", "user", "min_tokens", "trimcpp"})


ENCODER_OPTIONS = {"image_min_tokens": "image_min_tokens", "image_max_tokens": "image_max_tokens"}  # option: field


@contextlib.contextmanager
def request_options(handler: Optional[Trimming], options: Optional[TrimOptions], model: str) -> Iterator[None]:
    """The handler with this request's pruning options, its own settings back afterwards."""
    given = {} if options is None else options.model_dump(exclude_none=True)  # not overlay: the answer's, not the handler's
    if not given:
        yield
        return
    if handler is None:
        raise ValueError(f"model {model!r} does not prune images: \"trimcpp\" options are for trim-* chat formats")
    encoder = {ENCODER_OPTIONS[name]: given.pop(name) for name in list(given) if name in ENCODER_OPTIONS}
    saved = {name: getattr(handler, name) for name in given}
    saved_encoder = handler.encoder
    try:
        if encoder:  # checked together (image_min_tokens against image_max_tokens)
            handler.set_encoder(**encoder)
        for name, value in given.items():
            setattr(handler, name, handler_keep(value) if name == "keep" else value)
        yield
    finally:
        for name, value in saved.items():
            setattr(handler, name, value)
        handler.restore_encoder(saved_encoder)


def image_rows(handler: Optional[Trimming]) -> Optional[list[dict[str, Any]]]:
    """Per image of the last call: the rows the LLM saw and the image's rows; ``preloaded`` (the
    rows came from the image cache or a preload: this call encoded nothing) and this call's
    ``seconds`` (``encode``, ``wait`` for a preload still encoding, ``select``, ``prefill`` of the
    image rows); for a picture sent to the preload route, which ``path`` answered ("full": every row,
    prefilled while the question was typed; "pruned") and ``prefilled_rows``."""
    if handler is None:
        return None
    return [{"kept": image.kept, "rows": image.rows, "preloaded": image.preloaded,
             "seconds": {"encode": round(image.encode_seconds, 4), "wait": round(image.wait_seconds, 4),
                         "select": round(image.select_seconds, 4), "prefill": round(image.decode_seconds, 4)},
             **({} if image.path is None else {"path": image.path, "prefilled_rows": image.prefilled_rows})}
            for image in handler.last_selection]


def client_error(message: str, *, param: Optional[str] = None, status: int = 400, kind: str = "invalid_request_error",
                 code: Optional[str] = None) -> JSONResponse:
    """HTTP 400 (or `status`) in OpenAI's error format."""
    if code is None and ("n_ctx" in message or "context window" in message):
        code = "context_length_exceeded"
    error = {"message": message, "type": kind, "param": param, "code": code}
    return JSONResponse({"error": error}, status_code=status)


def _invalid(error: RequestValidationError) -> str:
    where = lambda problem: ".".join(str(p) for p in problem.get("loc", ()) if p != "body")  # noqa: E731
    return "invalid request: " + "; ".join(f"{where(p)}: {p.get('msg')}" for p in error.errors())


class TrimRoute(RouteErrorHandler):
    """The stock route class (OpenAI-style errors, ``openai-processing-ms``), with the client's
    mistakes as HTTP 400: an invalid body (stock: 422, or 500 when it is not JSON) and any ValueError
    (stock: 500)."""

    def get_route_handler(self):
        inner = APIRoute.get_route_handler(self)

        async def handler(request: Request):
            began = time.perf_counter()
            try:
                response = await inner(request)
            except HTTPException:
                raise
            except RequestValidationError as error:
                response = client_error(_invalid(error))
            except ValueError as error:
                response = client_error(str(error), param="messages" if isinstance(error, ImageRefused) else None)
            except Exception as error:  # noqa: BLE001 - the stock answer: HTTP 500 with the message, trace logged
                status, body = self.error_message_wrapper(error)
                response = JSONResponse({"error": body}, status_code=status)
            response.headers["openai-processing-ms"] = str(int((time.perf_counter() - began) * 1000))
            return response

        return handler


class HeldStream(EventSourceResponse):
    """An SSE answer that lets go of the model when it ends, however it ends (even unsent)."""

    def __init__(self, content: AsyncIterator[dict[str, str]], release: Any, **kwargs: Any):
        super().__init__(content, **kwargs)
        self._release = release

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self._release()


router = APIRouter(route_class=TrimRoute)


@router.post(CHAT_PATH, summary="Chat", dependencies=[Depends(stock_app.authenticate)], tags=["OpenAI V1"])
async def create_chat_completion(request: Request, body: TrimChatCompletionRequest):
    """OpenAI's chat completions, with the request's images pruned by trim-* models."""
    began = time.perf_counter()
    _HANDLER_ROUTE.set(True)
    server: TrimServerSettings = next(stock_app.get_server_settings())
    messages = await run_in_threadpool(localise, body.messages, ImagePolicy.from_settings(server))
    kwargs = {**completion_kwargs(body), "messages": messages}

    hold = contextlib.AsyncExitStack()
    proxy = await hold.enter_async_context(contextlib.asynccontextmanager(stock_app.get_llama_proxy)())
    try:
        # In the threadpool: asking for another model loads it (and frees this one).
        llama = await run_in_threadpool(stock_app.prepare_request_resources, body, proxy, body.model, kwargs)
        handler = trimmed_handler(llama)
        # Entered and left in the threadpool: a change of encoder settings waits for an encode in flight.
        # Shielded: a client gone meanwhile must not leave the handler with this request's settings.
        options = request_options(handler, body.trimcpp, body.model or "default")
        with anyio.CancelScope(shield=True):
            await run_in_threadpool(options.__enter__)
        try:
            result = await run_in_threadpool(llama.create_chat_completion, **kwargs)
            if body.stream:  # the prompt is evaluated at the first chunk: its errors are the request's
                first = await run_in_threadpool(next, result, None)
                first_token = time.perf_counter() - began
        finally:
            with anyio.CancelScope(shield=True):
                await run_in_threadpool(options.__exit__, None, None, None)
        rows = image_rows(handler)
        selections = list(handler.last_selection) if handler is not None else []
    except BaseException:
        await hold.aclose()
        raise
    headers = {} if rows is None else {ROWS_HEADER: ", ".join(f"{r['kept']}/{r['rows']}" for r in rows)}
    extra = {} if rows is None else {"trimcpp": {"images": rows}}
    overlay = rows is not None and body.trimcpp is not None and body.trimcpp.overlay

    async def overlaid() -> list[dict[str, Any]]:
        """The images with their overlays (trimcpp.serve.overlay): drawn after the answer."""
        pictures = [_data_only(part_url(part)) for _, part in image_parts(messages)]
        drawn = await run_in_threadpool(image_overlays, handler.clip_model_path, pictures, selections)
        return [{**row, **image} for row, image in zip(rows, drawn)]

    if rows is not None and body.stream:
        extra["trimcpp"]["first_token_seconds"] = round(first_token, 4)
    if not body.stream:
        try:  # drawn holding the model: a first overlay may probe libmtmd's layout with a Llama of its own
            if overlay:
                extra["trimcpp"]["images"] = await overlaid()
        finally:
            await hold.aclose()
        return JSONResponse({**result, **extra}, headers=headers)

    async def events() -> AsyncIterator[dict[str, str]]:
        if first is not None:
            yield {"data": json.dumps({**first, **extra})}
            async for chunk in iterate_in_threadpool(result):
                yield {"data": json.dumps(chunk)}
                if server.interrupt_requests and stock_app.llama_outer_lock.locked():
                    break  # another request waits: the stock server's interrupt_requests
            if overlay:  # a last chunk without choices, as OpenAI's usage chunk
                last = {name: first[name] for name in ("id", "object", "created", "model") if name in first}
                yield {"data": json.dumps({**last, "choices": [], "trimcpp": {"images": await overlaid()}})}
        yield {"data": "[DONE]"}

    ping = (lambda: bytes()) if server.disable_ping_events else None
    return HeldStream(events(), hold.aclose, sep="\n", ping_message_factory=ping, headers=headers)


class ImageURL(BaseModel):
    url: str


class PreloadRequest(BaseModel):
    """``POST /v1/trimcpp/preload``: one image part of a chat message, or the conversation so far,
    and which model will be asked."""

    model_config = ConfigDict(extra="forbid")

    model: Optional[str] = Field(default=None, description="the model the question will go to (default: the default one)")
    type: Optional[str] = Field(default=None, description="\"image_url\" (optional: the body is an image part)")
    image_url: Optional[Union[str, ImageURL]] = Field(default=None, description="the picture, as a chat message's "
                                                      "image_url part gives it (or give messages)")
    messages: Optional[list[dict[str, Any]]] = Field(default=None, description="instead of image_url: the conversation "
                                                     "so far, ending with the user message that holds the picture(s), "
                                                     "without the question (its system prompt is prefilled too)")
    wait: bool = Field(default=True, description="answer when the picture is encoded (200), else at once (202)")

    @field_validator("type")
    @classmethod
    def _image_part(cls, value: Optional[str]) -> Optional[str]:
        if value not in (None, "image_url"):
            raise ValueError(f"a preload takes an image_url part, got type {value!r}")
        return value

    def conversation(self) -> list[dict[str, Any]]:
        """The messages to attach: `messages`, or one user message with the picture."""
        if (self.image_url is None) == (self.messages is None):
            raise ValueError("a preload takes an image_url or messages (the conversation so far), one of them")
        if self.messages is not None:
            return self.messages
        url = self.image_url if isinstance(self.image_url, str) else self.image_url.url
        return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]


def preloaded(result: Preloaded) -> dict[str, Any]:
    return {"status": "ready", "digest": result.digest, "rows": result.rows, "chunk_rows": result.chunk_rows,
            "encode_seconds": round(result.encode_seconds, 3), "cached": result.encode_seconds == 0}


@router.post(PRELOAD_PATH, summary="Preload an image", dependencies=[Depends(stock_app.authenticate)], tags=["trimcpp"])
async def preload(body: PreloadRequest):
    """Encodes a picture into a trim-* model's image cache before the question about it comes, and
    then (``attach_policy`` auto or full) prefills it into the model's KV cache while the model is
    idle (``handler.attach``).

    With ``wait`` (the default) the answer comes when the encode is done: 200 with ``rows``,
    ``chunk_rows``, ``encode_seconds`` (0 and ``cached`` when the picture was already encoded) and
    ``digest`` (of the first picture; ``images`` has one such entry per picture), ``prefill`` (its
    ``state``, ``rows`` and ``prefilled_rows`` so far; ``GET`` this route for later progress), or
    the encode's error (400 for a picture that is refused or not an image, or code
    ``model_not_trimmed`` for a stock model; 409 when the preload gave up because the model's encoder
    settings changed or the model was unloaded before it started).
    Without, 202 at once with ``status`` "encoding" (or "ready"; an encode already failed is its
    error). The images policy is the chat route's. It takes the model as a chat request does: an
    answer in progress is waited for before it returns, even with ``wait`` false (and with
    ``interrupt_requests`` on it cuts a streaming answer short, as any request does). A new preload
    stops the previous one's prefill; so does a chat request about another conversation, and any
    other route that uses the model. The picture is encoded with the model's settings of that
    moment: a chat request with its own ``image_min_tokens`` / ``image_max_tokens`` does not find it."""
    _HANDLER_ROUTE.set(True)
    server: TrimServerSettings = next(stock_app.get_server_settings())
    messages = await run_in_threadpool(localise, body.conversation(), ImagePolicy.from_settings(server))
    async with contextlib.asynccontextmanager(stock_app.get_llama_proxy)() as proxy:
        if proxy is None:
            raise HTTPException(status_code=503, detail="Service is not available")
        llama = await run_in_threadpool(proxy, body.model)  # another model: loading it frees this one
        handler = trimmed_handler(llama)
        if handler is None:
            return client_error(f"model {body.model or 'default'!r} does not prune images: preload is for trim-* chat "
                                "formats", code="model_not_trimmed")
        # In the threadpool: a first preload loads the mmproj, and may wait for an encode in flight.
        future = await run_in_threadpool(handler.attach, messages, llama=llama)
    encodes = future.encodes
    done = all(encode.done() for encode in encodes)  # read once: they may land meanwhile
    failed = done and any(encode.exception() is not None for encode in encodes)
    if not body.wait and not failed:
        return JSONResponse({"status": "ready" if done else "encoding", "prefill": future.progress()}, status_code=202)
    try:
        # Shielded: a client that hangs up does not cancel an encode that a request may be waiting for.
        images = [preloaded(await asyncio.shield(asyncio.wrap_future(encode))) for encode in encodes]
    except PreloadSuperseded as error:
        return client_error(f"the preload gave up: {error}; send it again", status=409, kind="conflict",
                            code="preload_superseded")
    return {**images[0], "images": images, "prefill": future.progress()}


@router.get(PRELOAD_PATH, summary="Preload progress", dependencies=[Depends(stock_app.authenticate)], tags=["trimcpp"])
async def preload_progress(model: Optional[str] = None):
    """The last preload's progress on the model (default: the default one): ``prefill`` with its
    ``state`` ("encoding", "waiting" for the model to be idle, "prefilling", "prefilled", "stopped",
    "encoded" when the model's attach_policy is pruned, "failed"), ``rows`` and ``prefilled_rows``,
    null when there is none; and ``images_encoded``, the pictures the model's image encoder has run on
    since it loaded. ``{"prefill": null}`` when the model is not loaded. Does not wait for the model."""
    proxy = stock_app._llama_proxy
    llama = getattr(proxy, "_current_model", None)
    alias = model if proxy is not None and model in proxy._model_settings_dict else getattr(proxy, "_default_model_alias", None)
    if llama is None or alias != proxy._current_model_alias:
        return {"prefill": None}
    handler = trimmed_handler(llama)
    if handler is None:
        raise ValueError(f"model {model or 'default'!r} does not prune images: preload is for trim-* chat formats")
    return {"prefill": handler.attach_progress(), "images_encoded": handler.images_encoded}


PAGE_FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
              "style.css": "text/css; charset=utf-8"}
# The page loads nothing from another host and runs no inline script: model text that reached the
# document as markup could still not run.
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                "img-src 'self' data: blob:; connect-src 'self'; form-action 'none'; base-uri 'none'; "
                "frame-ancestors 'none'", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
                "Cache-Control": "no-cache"}


def page_router() -> APIRouter:
    """``GET /``: the chat page (``trimcpp/serve/page``), and its script and style under ``/page/``."""
    folder = importlib.resources.files(__package__) / "page"
    pages = APIRouter()

    def route(name: str) -> Any:
        return lambda: Response(folder.joinpath(name).read_bytes(), media_type=PAGE_FILES[name], headers=PAGE_HEADERS)

    pages.add_api_route("/", route("index.html"), methods=["GET"], include_in_schema=False)
    for name in PAGE_FILES:
        pages.add_api_route(f"/page/{name}", route(name), methods=["GET"], include_in_schema=False)
    return pages


@contextlib.contextmanager
def _replaced(module: Any, name: str, value: Any) -> Iterator[None]:
    saved = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, saved)


def create_app(server_settings: TrimServerSettings, model_settings: list[TrimModelSettings]) -> FastAPI:
    """llama-cpp-python's app for these settings, with trimcpp's proxy and chat route; loads the first model.

    The stock chat route is replaced in the stock router itself (``llama_cpp.server.app.router``), which
    every app includes: FastAPI may copy its routes or refer to it."""
    routes = stock_app.router.routes
    routes[next(i for i, route in enumerate(routes) if getattr(route, "path", None) == CHAT_PATH)] = router.routes[0]
    if not any(getattr(route, "path", None) == PRELOAD_PATH for route in routes):
        routes += router.routes[1:3]
    config_file = os.environ.pop("CONFIG_FILE", None)  # read by trimcpp.serve.main, with trimcpp's settings
    try:
        with _replaced(stock_app, "LlamaProxy", TrimLlamaProxy):
            app = stock_app.create_app(server_settings=server_settings, model_settings=model_settings)
    finally:
        if config_file is not None:
            os.environ["CONFIG_FILE"] = config_file
    if server_settings.page:
        app.include_router(page_router())
    app.add_middleware(MarkPath)
    return app
