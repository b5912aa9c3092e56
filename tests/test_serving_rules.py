"""The endpoint's request rules and its Serve config file, without starting Serve."""

import pytest
import yaml
from ray.serve.llm.openai_api_models import ChatCompletionRequest
from ray.serve.schema import ServeDeploySchema

from clinicalgpt.config import ServeConfig
from clinicalgpt.serving import ApiError, ChatRules, build_app, load_api_keys
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
    with pytest.raises(SystemExit, match="no ppo model"):  # the builder resolves the model it serves
        build_app({"overrides": [*app.args["overrides"], "run_root=/nonexistent"]})
