"""The endpoint's request rules, rate limits, request gate (size limit, audit log) and its Serve config file,
without starting Serve."""

import asyncio
import hmac
import json

import httpx
import pytest
import yaml
from ray.serve.llm.openai_api_models import ChatCompletionRequest
from ray.serve.schema import ServeDeploySchema

from clinicalgpt.config import ServeConfig
from clinicalgpt.serving import (ApiError, AuditLog, ChatRules, RequestGate, TokenBuckets, build_app, check_open,
                                 load_api_keys)
from clinicalgpt.tokenizer import prompt_ids, train_tokenizer
from conftest import REPO

SYSTEM = "你是医疗健康助手。"


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(["高血压患者可以吃党参吗？", "建议低盐饮食，按时服药。"] * 20, vocab_size=300)


def rules(tokenizer, keys=(), **settings) -> ChatRules:
    return ChatRules(ServeConfig(**{"system_prompt": SYSTEM, **settings}), tokenizer, set(keys))


def request(**body) -> ChatCompletionRequest:
    return ChatCompletionRequest(**{"model": "clinicalgpt", "messages": [{"role": "user", "content": "头痛怎么办"}],
                                    **body})


def refusal(fn, *args) -> ApiError:
    with pytest.raises(ApiError) as e:
        fn(*args)
    return e.value


def test_the_operator_system_prompt_comes_first_and_absorbs_the_clients(tokenizer):
    r = rules(tokenizer)
    assert r.conversation([{"role": "user", "content": "头痛"}]) == [
        {"role": "system", "content": SYSTEM}, {"role": "user", "content": "头痛"}]
    chat = r.conversation([{"role": "system", "content": "请简短回答"}, {"role": "user", "content": "头痛"}])
    assert chat[0] == {"role": "system", "content": SYSTEM + "\n\n请简短回答"} and len(chat) == 2
    # Content given as a list of parts is read as its text.
    parts = [{"type": "text", "text": "头"}, {"type": "text", "text": "痛"}]
    assert r.conversation([{"role": "user", "content": parts}])[1]["content"] == "头痛"
    assert rules(tokenizer, system_prompt="").conversation([{"role": "user", "content": "头痛"}]) == [
        {"role": "user", "content": "头痛"}]


@pytest.mark.parametrize("messages, param", [
    ([], "messages"),
    ([{"role": "doctor", "content": "x"}], "messages[0].role"),
    ([{"content": "x"}], "messages[0].role"),
    ([{"role": "user", "content": "   "}], "messages[0].content"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}], "messages[1].content"),
    ([{"role": "system", "content": "only a system turn"}], "messages"),
])
def test_bad_conversations_are_refused_with_the_field_named(tokenizer, messages, param):
    error = refusal(rules(tokenizer).conversation, messages)
    assert (error.status, error.param) == (400, param)


def test_sampling_limits_and_the_default_budget(tokenizer):
    r = rules(tokenizer, max_tokens=64)
    assert r.sampling(None, None, None) == 64 and r.sampling(10, 0.0, 1.0) == 10
    for args, param in [((65, None, None), "max_tokens"), ((0, None, None), "max_tokens"),
                        ((None, 2.5, None), "temperature"), ((None, -0.1, None), "temperature"),
                        ((None, None, 0.0), "top_p"), ((None, None, 1.5), "top_p")]:
        assert refusal(r.sampling, *args).param == param


def test_completions_and_log_prob_alternatives_are_bounded(tokenizer):
    r = rules(tokenizer, max_n=4, max_top_logprobs=5)
    r.bound_cost(4, 5, 5)
    r.bound_cost(None, None, None)
    for args, param in [((1000, None, None), "n"), ((0, None, None), "n"), ((None, 6, None), "top_logprobs"),
                        ((None, -1, None), "top_logprobs"), ((None, None, 20), "prompt_logprobs")]:
        error = refusal(r.bound_cost, *args)
        assert (error.status, error.param) == (400, param)
    assert refusal(r.prepare, request(n=1000)).param == "n"  # checked on every request
    assert r.prepare(request(n=2, logprobs=True, top_logprobs=5)).n == 2


def test_prompt_and_completion_must_fit_the_model_length(tokenizer):
    r = rules(tokenizer, max_model_len=64)
    chat = r.conversation([{"role": "user", "content": "头痛怎么办"}])
    fits = 64 - len(prompt_ids(tokenizer, chat))
    r.check_length(chat, fits)
    error = refusal(r.check_length, chat, fits + 1)
    assert (error.status, error.code) == (400, "context_length_exceeded")


def test_prepare_fills_in_the_model_the_budget_and_the_system_prompt(tokenizer):
    body = rules(tokenizer, max_tokens=32).prepare(request(model=None))
    assert body.model == "clinicalgpt" and body.max_completion_tokens == 32 and body.max_tokens is None
    assert body.messages[0] == {"role": "system", "content": SYSTEM}
    assert rules(tokenizer).prepare(request(max_tokens=8)).max_completion_tokens == 8
    assert refusal(rules(tokenizer).prepare, request(model="gpt-4")).status == 404


def test_api_keys_from_the_environment_and_a_file(tokenizer, tmp_path, monkeypatch):
    key_file = tmp_path / "keys"
    key_file.write_text("# one key a line\nkey-b\n\n  key-c \n")
    monkeypatch.setenv("TEST_SERVE_KEY", "key-a")
    keys = load_api_keys(ServeConfig(api_key_env="TEST_SERVE_KEY", api_key_file=str(key_file)))
    assert keys == {"key-a", "key-b", "key-c"}
    monkeypatch.delenv("TEST_SERVE_KEY")
    assert load_api_keys(ServeConfig(api_key_env="TEST_SERVE_KEY")) == set()

    r = rules(tokenizer, keys=keys)
    for header in ("Bearer key-b", "bearer key-c"):
        r.authorize(header)
    for header in (None, "", "Bearer", "Bearer key-d", "Basic key-a", "key-a"):
        assert refusal(r.authorize, header).status == 401
    rules(tokenizer).authorize(None)  # no keys configured: open


def test_the_serve_config_file_is_valid_and_names_the_builder():
    spec = yaml.safe_load((REPO / "jobs" / "serve.yaml").read_text())
    config = ServeDeploySchema.model_validate(spec)
    app = config.applications[0]
    assert app.import_path == "clinicalgpt.serving:build_app"
    assert app.args["deployment_config"]["autoscaling_config"]["max_replicas"] >= \
        app.args["deployment_config"]["autoscaling_config"]["min_replicas"] >= 1
    # Serve binds every address (http_options.host), so the builder refuses to start without keys...
    with pytest.raises(SystemExit, match="refusing to start an open endpoint on 0.0.0.0"):
        build_app({"overrides": [*app.args["overrides"], "run_root=/nonexistent", "serve.api_key_env=NO_SUCH_VAR"]})
    with pytest.raises(SystemExit, match="no ppo model"):  # ...and with them resolves the model it serves
        build_app({"overrides": [*app.args["overrides"], "run_root=/nonexistent", "serve.allow_open=true"]})


def test_an_endpoint_without_keys_starts_only_on_loopback_unless_allowed(tmp_path, caplog):
    open_settings = ServeConfig(api_key_env="NO_SUCH_VAR")
    for host in ("0.0.0.0", "10.1.2.3", "::", "gpu-node-1"):
        with pytest.raises(SystemExit, match=f"open endpoint on {host}: no API key in .NO_SUCH_VAR"):
            check_open(open_settings, host)
    with caplog.at_level("WARNING"):
        for host in ("127.0.0.1", "::1", "localhost"):
            check_open(open_settings, host)
        check_open(ServeConfig(api_key_env="NO_SUCH_VAR", allow_open=True), "0.0.0.0")
    assert sum("OPEN ENDPOINT" in r.message for r in caplog.records) == 4  # said loudly, each time
    caplog.clear()
    (tmp_path / "keys").write_text("key-a\n")
    check_open(ServeConfig(api_key_env="NO_SUCH_VAR", api_key_file=str(tmp_path / "keys")), "0.0.0.0")
    assert not caplog.records


def test_only_openai_chat_parameters_are_taken(tokenizer):
    """vLLM's extensions (a client's own chat template, beam search, ignore_eos, ...) are refused by name."""
    for extra in ({"chat_template": "{{ 7*7 }}"}, {"use_beam_search": True}, {"ignore_eos": True},
                  {"min_tokens": 200}, {"echo": True}, {"tools": [{"type": "function", "function": {"name": "f"}}]}):
        error = refusal(rules(tokenizer).prepare, request(**extra))
        assert (error.status, error.code) == (400, "unsupported_parameter") and next(iter(extra)) in error.message
    body = rules(tokenizer).prepare(request(stop=["。"], seed=3, user="u1", frequency_penalty=0.5, stream=True))
    assert body.stop == ["。"] and body.stream_options.include_usage  # the audit's token counts, from the engine


def test_token_buckets_by_hand():
    """60 a minute (one a second), bursts of 2, per client."""
    b = TokenBuckets(per_minute=60, burst=2)
    assert [b.take("a", now=0.0), b.take("a", now=0.0)] == [0.0, 0.0]  # the burst
    assert b.take("a", now=0.0) == pytest.approx(1.0)  # empty: one token a second
    assert b.take("a", now=0.5) == pytest.approx(0.5)  # half a token back: half a second to go
    assert b.take("b", now=0.5) == 0.0  # another client has its own bucket
    assert b.take("a", now=1.5) == 0.0  # 0.5 + 1.0 tokens: one spent, 0.5 left
    assert b.take("a", now=1.6) == pytest.approx(0.4)
    assert b.take("a", now=100.0) == 0.0 and b.buckets["a"] == (1.0, 100.0)  # refilled only up to the burst


def test_a_429_says_when_to_retry():
    r = ApiError(429, "rate limit reached", code="rate_limit_exceeded", retry_after=1.2).response()
    assert r.status_code == 429 and r.headers["retry-after"] == "2"
    assert json.loads(r.body)["error"] == {"message": "rate limit reached", "type": "rate_limit_error", "param": None,
                                           "code": "rate_limit_exceeded"}


def test_the_gate_refuses_big_bodies_and_audits_every_request_without_its_body(tmp_path):
    """The ingress's outermost layer, around a small FastAPI app: a 413 before the app reads a body over the limit
    (declared or streamed), and one audit line per request with the key's HMAC, never the key or the body."""
    from fastapi import FastAPI, Request

    app, seen = FastAPI(), []

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        seen.append(await request.body())
        request.state.prompt_tokens, request.state.completion_tokens = 7, 3
        return {"ok": True}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    audit = AuditLog(str(tmp_path / "audit"), secret="s3cret")
    gated = RequestGate(app, max_bytes=100, audit=audit)
    headers = {"Authorization": "Bearer key-a"}

    async def calls():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gated), base_url="http://test") as c:
            ok = await c.post("/v1/chat/completions", content=b'{"secret": "patient-x"}', headers=headers)
            big = await c.post("/v1/chat/completions", content=b"x" * 101, headers=headers)

            async def chunks():  # no Content-Length: counted as it arrives
                for _ in range(3):
                    yield b"y" * 40
            streamed = await c.post("/v1/chat/completions", content=chunks())
            await c.get("/health")
            return ok, big, streamed

    ok, big, streamed = asyncio.run(calls())
    assert ok.status_code == 200 and seen == [b'{"secret": "patient-x"}']  # the app saw the whole body once
    for r in (big, streamed):
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    text = "".join(p.read_text() for p in (tmp_path / "audit").glob("*.jsonl"))
    lines = [json.loads(line) for line in text.splitlines()]
    assert [(x["route"], x["status"]) for x in lines] == [("/v1/chat/completions", 200)] + [
        ("/v1/chat/completions", 413)] * 2  # /health (probes) is not audited
    keyed = hmac.new(b"s3cret", b"key-a", "sha256").hexdigest()[:16]
    assert [x["key"] for x in lines] == [keyed, keyed, None]
    assert (lines[0]["prompt_tokens"], lines[0]["completion_tokens"]) == (7, 3) and lines[0]["latency_s"] >= 0
    assert set(lines[0]) == {"time", "method", "route", "status", "key", "prompt_tokens", "completion_tokens",
                             "latency_s"}
    assert "patient-x" not in text and "key-a" not in text
