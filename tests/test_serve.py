"""The Ray Serve endpoint end to end (jobs/serve.py on the session's SFT model), driven by the official
openai client, raw HTTP and schemathesis: chat with and without streaming, models, health, API keys, bad and
generated requests in OpenAI's error shape (none takes the replica down), request size and rate limits, the
audit log, and a burst of concurrent requests."""

import asyncio
import collections
import copy
import hmac
import json
import os
import time
from pathlib import Path

import httpx
import openai
import pytest
import ray
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from ray import serve

from clinicalgpt.config import CLINICAL_SYSTEM_PROMPT
from clinicalgpt.serving import PARAMETERS
from clinicalgpt.tokenizer import load_tokenizer, prompt_ids
from conftest import free_ports, isolated_run, scrape_metrics

pytestmark = pytest.mark.e2e
KEY = "test-key-1"
LIMITED_KEY, FUZZ_KEYS = "test-key-limited", [f"test-key-fuzz-{i}" for i in range(8)]
AUDIT_SECRET, BURST = "audit-secret-for-tests", 300  # 60 requests a minute per key, bursts of 300
QUESTION = [{"role": "user", "content": "高血压患者可以吃党参吗？"}]


@pytest.fixture(scope="module")
def endpoint(trained, tmp_path_factory):
    from jobs import serve as serve_job
    cfg, _ = trained
    keys = tmp_path_factory.mktemp("serve") / "keys"
    keys.write_text("# clients\n" + "\n".join([KEY, LIMITED_KEY, *FUZZ_KEYS]) + "\n")
    os.environ["CLINICALGPT_AUDIT_KEY"] = AUDIT_SECRET
    try:
        url = serve_job.main([f"run_root={cfg.run_dir.parent}", f"data.root={cfg.data_root}", "serve.model=sft",
                              f"serve.api_key_file={keys}", "serve.max_tokens=32", "serve.requests_per_minute=60",
                              f"serve.request_burst={BURST}"], port=free_ports(1)[0])
    finally:
        del os.environ["CLINICALGPT_AUDIT_KEY"]
    yield url, cfg
    serve.shutdown()


def audit_lines(cfg) -> list[dict]:
    files = sorted((cfg.stage_dir("serve") / "audit").glob("*.jsonl"))
    return [json.loads(line) for f in files for line in f.read_text().splitlines()]


def client(url: str, key: str = KEY, cls=openai.OpenAI):
    return cls(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def test_chat_streaming_and_not_with_the_openai_client(endpoint):
    url, cfg = endpoint
    c = client(url)
    reply = c.chat.completions.create(model="clinicalgpt", messages=QUESTION, max_tokens=16, temperature=0)
    choice = reply.choices[0]
    assert reply.model == "clinicalgpt" and choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length") and 0 < reply.usage.completion_tokens <= 16
    # The model saw the operator's system prompt before the question, in its own chat template.
    tok = load_tokenizer(str(cfg.stage_dir("sft") / "final"))
    system = [{"role": "system", "content": CLINICAL_SYSTEM_PROMPT}]
    assert reply.usage.prompt_tokens == len(prompt_ids(tok, system + QUESTION))

    chunks = list(c.chat.completions.create(model="clinicalgpt", messages=QUESTION, max_tokens=16, temperature=0,
                                            stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == choice.message.content
    with httpx.stream("POST", f"{url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=120,
                      json={"model": "clinicalgpt", "messages": QUESTION, "max_tokens": 4, "stream": True}) as r:
        events = [line for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert events[0].startswith("data: {") and events[-1] == "data: [DONE]"


def test_models_health_and_api_keys(endpoint):
    url, _ = endpoint
    assert [m.id for m in client(url).models.list().data] == ["clinicalgpt"]
    assert client(url).models.retrieve("clinicalgpt").id == "clinicalgpt"
    assert httpx.get(f"{url}/health").json() == {"status": "ok", "model": "clinicalgpt"}  # no key needed
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        for method, route in (("POST", "/v1/chat/completions"), ("GET", "/v1/models")):
            r = httpx.request(method, f"{url}{route}", headers=headers, json={"model": "clinicalgpt", "messages": QUESTION})
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client(url, key="wrong").chat.completions.create(model="clinicalgpt", messages=QUESTION)


BAD = [  # (body, status, words the message must contain)
    ("{not json", 400, "JSON"),
    ({"model": "clinicalgpt"}, 400, "messages"),
    ({"model": "clinicalgpt", "messages": []}, 400, "non-empty"),
    ({"model": "clinicalgpt", "messages": [{"role": "doctor", "content": "x"}]}, 400, "role"),
    ({"model": "clinicalgpt", "messages": [{"role": "user", "content": ""}]}, 400, "empty"),
    ({"model": "clinicalgpt", "messages": QUESTION, "max_tokens": 1000}, 400, "max_tokens"),
    ({"model": "clinicalgpt", "messages": [{"role": "user", "content": "头痛" * 600}]}, 400, "token limit"),
    ({"model": "clinicalgpt", "messages": QUESTION, "temperature": 3}, 400, "temperature"),
    ({"model": "clinicalgpt", "messages": QUESTION, "top_p": 0}, 400, "top_p"),
    ({"model": "clinicalgpt", "messages": QUESTION, "n": 1000}, 400, "n must be"),  # was a 200: 1000 generations
    ({"model": "clinicalgpt", "messages": QUESTION, "logprobs": True, "top_logprobs": 6}, 400, "top_logprobs"),
    ({"model": "gpt-4", "messages": QUESTION}, 404, "not found"),
    ({"model": "clinicalgpt", "messages": False}, 400, "malformed request"),  # was a 500 (found by the fuzzing below)
    ({"model": "clinicalgpt", "messages": QUESTION, "chat_template": "{{ 7 * 7 }}"}, 400, "unsupported parameter"),
    ({"model": "clinicalgpt", "messages": QUESTION, "use_beam_search": True}, 400, "unsupported parameter"),
]


def test_bad_requests_get_a_4xx_with_a_message_and_the_replica_stays_up(endpoint):
    url, _ = endpoint
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    for body, status, words in BAD:
        kwargs = {"content": body} if isinstance(body, str) else {"json": body}
        r = httpx.post(f"{url}/v1/chat/completions", headers=headers, timeout=60, **kwargs)
        assert r.status_code == status, (body, r.text)
        assert words in r.json()["error"]["message"], (body, r.text)
    for method, route, body in (("GET", "/v1/nothing", None), ("DELETE", "/v1/models", None),
                                ("POST", "/v1/chat/completions", b"\x8f\x99\x95")):  # not UTF-8
        r = httpx.request(method, f"{url}{route}", headers=headers, content=body, timeout=60)
        assert r.status_code in (400, 404, 405), r.text
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text
    big = {"model": "clinicalgpt", "messages": [{"role": "user", "content": "头痛" * 400_000}]}  # 2.4 MB
    r = httpx.post(f"{url}/v1/chat/completions", headers=headers, json=big, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    reply = client(url).chat.completions.create(model="clinicalgpt", messages=QUESTION, max_tokens=4)
    assert reply.choices[0].message.content is not None


def test_generated_requests_get_no_5xx_and_every_refusal_in_openai_shape(endpoint):
    """schemathesis from the deployment's own OpenAPI schema (the chat request is vLLM's model, every extension
    field in it), and from the same schema narrowed to OpenAI's chat parameters with well-formed messages (so
    generated requests reach the engine): valid and invalid bodies, at least 1,000 requests."""
    url, _ = endpoint
    deployed = httpx.get(f"{url}/openapi.json").json()
    narrowed = copy.deepcopy(deployed)
    ref = narrowed["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    chat = narrowed["components"]["schemas"][ref["$ref"].rsplit("/", 1)[1]]
    chat["properties"] = {k: v for k, v in chat["properties"].items() if k in PARAMETERS}
    turn = {"role": {"enum": ["system", "user", "assistant"]}, "content": {"type": "string", "maxLength": 80}}
    chat["properties"]["messages"] = {"type": "array", "minItems": 1, "maxItems": 3,
                                      "items": {"type": "object", "required": ["role", "content"], "properties": turn}}
    statuses, wrong, sent = collections.Counter(), [], [0]

    for name, raw in (("deployed", deployed), ("narrowed", narrowed)):
        for operation in schemathesis.openapi.from_dict(raw).get_all_operations():
            operation = operation.ok()
            for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
                @given(case=operation.as_strategy(generation_mode=mode))
                @settings(max_examples=250 if operation.method == "post" else 50, deadline=None, database=None,
                          phases=[Phase.generate], suppress_health_check=list(HealthCheck))
                def call(case):
                    sent[0] += 1
                    key = FUZZ_KEYS[sent[0] % len(FUZZ_KEYS)]
                    r = case.call(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120)
                    statuses[(name, operation.label, r.status_code)] += 1
                    try:
                        shaped = r.status_code < 400 or set(r.json()["error"]) == {"message", "type", "param", "code"}
                    except (ValueError, KeyError, TypeError):
                        shaped = False
                    if r.status_code >= 500 or not shaped:
                        wrong.append((operation.label, r.status_code, r.text[:300], repr(case.body)[:300]))

                try:
                    call()
                except Unsatisfiable:  # nothing to make invalid (GET /health has no input)
                    pass
    counts = {" ".join(map(str, k)): v for k, v in sorted(statuses.items())}
    print(f"\n{sent[0]} generated requests:", json.dumps(counts, indent=1))
    assert sent[0] >= 1000 and not wrong, wrong[:5]
    classes = collections.Counter(f"{status // 100}xx" for (_, _, status) in statuses.elements())
    assert classes["2xx"] >= 10 and classes["4xx"] >= 500, classes  # both the engine and the checks were reached
    assert httpx.get(f"{url}/health").status_code == 200
    reply = client(url).chat.completions.create(model="clinicalgpt", messages=QUESTION, max_tokens=4)
    assert reply.choices[0].message.content is not None


def test_rate_limits_per_key_answer_429_with_retry_after(endpoint):
    """A key's burst is spent, then a 429 in OpenAI's shape with Retry-After (the openai client's RateLimitError);
    other keys are untouched, and the key is served again once its wait is over."""
    url, _ = endpoint
    headers, answered, started = {"Authorization": f"Bearer {LIMITED_KEY}"}, 0, time.monotonic()
    while (r := httpx.get(f"{url}/v1/models", headers=headers, timeout=60)).status_code == 200 and answered < 2 * BURST:
        answered += 1
    refill = time.monotonic() - started  # a request a second comes back while the burst is spent
    assert r.status_code == 429 and BURST <= answered <= BURST + refill + 1, (r.status_code, answered)
    assert r.json()["error"]["code"] == "rate_limit_exceeded" and 1 <= int(r.headers["retry-after"]) <= 2
    with pytest.raises(openai.RateLimitError):
        client(url, key=LIMITED_KEY).models.list()
    assert client(url).models.list().data  # another key
    time.sleep(int(r.headers["retry-after"]) + 0.1)
    assert httpx.get(f"{url}/v1/models", headers=headers, timeout=60).status_code == 200


def test_every_request_has_an_audit_line_with_a_keyed_hash_and_token_counts(endpoint):
    """Answered (streamed and not), unauthorised and oversized requests, in order: status, the key's HMAC (keyed
    with $CLINICALGPT_AUDIT_KEY), the engine's token counts; never the key."""
    url, cfg = endpoint
    before = len(audit_lines(cfg))
    reply = client(url).chat.completions.create(model="clinicalgpt", messages=QUESTION, max_tokens=5, temperature=0)
    chunks = list(client(url).chat.completions.create(model="clinicalgpt", messages=QUESTION, max_tokens=6,
                                                      temperature=0, stream=True))
    assert all(ch.choices for ch in chunks)  # the engine's usage chunk is not passed on unasked
    httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer wrong-key"})
    httpx.post(f"{url}/v1/chat/completions", content=b"{" * 2_000_000, headers={"Authorization": f"Bearer {KEY}"})
    time.sleep(1)
    lines = audit_lines(cfg)[before:]
    assert [(x["method"], x["route"], x["status"]) for x in lines] == [
        ("POST", "/v1/chat/completions", 200), ("POST", "/v1/chat/completions", 200), ("GET", "/v1/models", 401),
        ("POST", "/v1/chat/completions", 413)]
    mine, wrong = (hmac.new(AUDIT_SECRET.encode(), k, "sha256").hexdigest()[:16] for k in (KEY.encode(), b"wrong-key"))
    assert [x["key"] for x in lines] == [mine, mine, wrong, mine]
    assert (lines[0]["prompt_tokens"], lines[0]["completion_tokens"]) == (reply.usage.prompt_tokens,
                                                                          reply.usage.completion_tokens)
    assert lines[1]["prompt_tokens"] == reply.usage.prompt_tokens and 0 < lines[1]["completion_tokens"] <= 6
    assert all(x["latency_s"] > 0 for x in lines)
    text = "".join(p.read_text() for p in (cfg.stage_dir("serve") / "audit").glob("*.jsonl"))
    assert KEY not in text and "wrong-key" not in text


def test_a_burst_of_concurrent_requests_all_succeed(endpoint):
    url, _ = endpoint

    async def burst(n: int):
        c = client(url, cls=openai.AsyncOpenAI)
        questions = [[{"role": "user", "content": f"第{i}个问题：咳嗽一周了怎么办？"}] for i in range(n)]
        return await asyncio.gather(*(c.chat.completions.create(model="clinicalgpt", messages=q, max_tokens=16)
                                      for q in questions))

    replies = asyncio.run(burst(32))
    assert len(replies) == 32 and all(r.choices[0].message.content is not None for r in replies)
    assert len({r.id for r in replies}) == 32


def test_request_bodies_are_not_logged(endpoint):
    """Bodies may hold patient data: neither an answered nor a refused one reaches any log of the cluster, nor the
    audit log."""
    url, cfg = endpoint
    marker = "patient-secret-7f3a9c"
    headers = {"Authorization": f"Bearer {KEY}"}
    for body in ({"messages": [{"role": "user", "content": f"{marker} headache"}], "max_tokens": 4},
                 {"messages": [{"role": "doctor", "content": marker}]},
                 {"messages": [{"role": "user", "content": marker}], "temperature": 9}):
        httpx.post(f"{url}/v1/chat/completions", headers=headers, json={"model": "clinicalgpt", **body}, timeout=60)
    time.sleep(3)  # log lines reach their files
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"  # this cluster's logs
    files = [p for p in [*logs.rglob("*"), *(cfg.stage_dir("serve") / "audit").rglob("*")] if p.is_file()]
    assert files and not [str(p) for p in files if marker.encode() in p.read_bytes()]


def test_the_endpoint_is_an_evaluation_candidate(endpoint, tmp_path, monkeypatch):
    """jobs/eval.py with the deployment as a candidate (an eval.endpoints entry with its key's variable): its answers
    are the endpoint's own greedy replies, and the report says what an endpoint cannot give."""
    from jobs import eval as evaluation
    url, cfg = endpoint
    monkeypatch.setenv("SERVE_TEST_KEY", KEY)
    run_root = isolated_run(cfg, tmp_path, shared=("data",))
    results = evaluation.main([f"run_root={run_root}", f"data.root={cfg.data_root}", "eval.models=[served]",
                               f"eval.endpoints.served.url={url}/v1", "eval.endpoints.served.model=clinicalgpt",
                               "eval.endpoints.served.key_env=SERVE_TEST_KEY", "eval.families=[exam,bias]",
                               "eval.items.exam=8", "eval.items.bias=8", "eval.max_new_tokens.exam=16"])
    assert results["items"] == {"exam": 8, "bias": 8} and results["dropped"] == {"exam": {}, "bias": {}}
    assert results["endpoints"] == {"served": ["exam option likelihood", "bias scale-point likelihood"]}
    assert "likelihood_accuracy" not in results["families"]["exam"]["served"]
    assert set(results["families"]["bias"]["served"]) == {"generated"}
    out = run_root / cfg.preset / "eval"
    assert "`served` answers through an endpoint, which cannot give: exam option likelihood" in (
        out / "report.md").read_text()
    line = json.loads((out / "items.jsonl").read_text().splitlines()[0])
    reply = client(url).chat.completions.create(model="clinicalgpt", messages=line["prompt"], max_tokens=16,
                                                temperature=0)
    assert line["candidate"] == "served" and line["answer"] == reply.choices[0].message.content


def test_serve_metrics_count_requests_errors_and_latency(endpoint, prometheus):
    """What the Grafana dashboard plots, scraped as Prometheus does, after the requests above; then, under a load of
    16 clients, every Serve panel of the dashboard has data on a real Prometheus."""
    names = {"ray_serve_num_http_requests_total", "ray_serve_num_http_error_requests_total",
             "ray_serve_http_request_latency_ms_count", "ray_serve_deployment_queued_queries"}
    app = {"application": "clinicalgpt"}

    def total(samples, name: str, **labels) -> float:
        return sum(s.value for s in samples[name] if all(s.labels.get(k) == v for k, v in {**app, **labels}.items()))

    def counted(samples) -> bool:  # Ray exports counters every few seconds: wait until the requests above show
        return (total(samples, "ray_serve_num_http_requests_total", status_code="200") >= 32  # the burst alone
                and total(samples, "ray_serve_num_http_error_requests_total", error_code="400") >= 9  # bad requests
                and total(samples, "ray_serve_num_http_error_requests_total", error_code="401") >= 4
                and total(samples, "ray_serve_http_request_latency_ms_count") >= 32 + len(BAD))

    def answered(samples) -> bool:  # the queue depth, a gauge exported like the counters: empty, all answered
        return total(samples, "ray_serve_deployment_queued_queries") == 0

    # Each export can be seconds behind the others: a fresh-clone run read the counters complete and the queue
    # depth still at 2, from the burst.
    samples = scrape_metrics(names, timeout=120, ready=lambda found: counted(found) and answered(found))
    assert names <= set(samples), sorted(samples)
    assert counted(samples), {name: [(s.labels, s.value) for s in found] for name, found in samples.items()}
    assert answered(samples), samples["ray_serve_deployment_queued_queries"]
    if prometheus:
        started = time.time()
        url, _ = endpoint

        async def load():
            c = client(url, cls=openai.AsyncOpenAI)
            for _ in range(3):
                await asyncio.gather(*(c.chat.completions.create(model="clinicalgpt", messages=QUESTION, max_tokens=8)
                                       for _ in range(16)))
                await asyncio.sleep(2)

        asyncio.run(load())
        print("Serve panels, points:", prometheus.check_panels("serve", started))


def test_an_adapter_is_served_merged_onto_its_base_by_a_ray_task(trained):
    """serve.adapter: the SFT adapter merged onto the pretrained model (on the cluster, not in the driver)
    gives the SFT model's weights."""
    import torch
    from transformers import AutoModelForCausalLM
    from clinicalgpt.config import load_config
    from clinicalgpt.serving import served_model
    cfg, _ = trained
    run = load_config([f"run_root={cfg.run_dir.parent}", f"data.root={cfg.data_root}", "serve.model=pretrain",
                       f"serve.adapter={cfg.stage_dir('sft') / 'adapter'}"])
    path = served_model(run)
    assert Path(path) == run.stage_dir("serve") / "merged-adapter" and (Path(path) / "tokenizer.json").exists()
    merged, sft = (AutoModelForCausalLM.from_pretrained(p).state_dict() for p in (path, cfg.stage_dir("sft") / "final"))
    assert merged.keys() == sft.keys()
    for name in merged:
        torch.testing.assert_close(merged[name], sft[name])
