"""The HTTP server (tensorstream/serve/app.py) under uvicorn on 127.0.0.1: the official OpenAI client (plain and
streaming, completions and chat) against the plain model's tokens, plain HTTP for every error case, a client that
goes away, a corrupt chunk, loading states, metrics, and the deployment guide's load test."""

from __future__ import annotations

import concurrent.futures
import time

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
prometheus_client = pytest.importorskip("prometheus_client")

import tensorstream as ts  # noqa: E402
from tensorstream.serve.app import Service, create_app  # noqa: E402
from tensorstream.serve.engine import EngineOptions  # noqa: E402
from tensorstream.serve.loader import ServeOptions  # noqa: E402
from tensorstream.testing.http_server import running_server  # noqa: E402
from tensorstream.testing.tiny_checkpoint import write_tiny_llama  # noqa: E402

NAME = "tiny"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("ckpt") / "tiny", hidden_size=64, layers=4)


@pytest.fixture(scope="module")
def plain(checkpoint):
    return transformers.AutoModelForCausalLM.from_pretrained(checkpoint).eval()


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    return transformers.AutoTokenizer.from_pretrained(checkpoint)


def offload(checkpoint, storage):
    model = ts.from_pretrained(checkpoint, ts.Config(storage_path=storage, vram_budget_gb=1e-6, min_layer_size=0))
    ts.get_model_statistics(model)
    return model


def serving(model, tokenizer, max_batch=8):
    return Service.for_model(model, tokenizer, NAME, EngineOptions(max_batch=max_batch),
                             registry=prometheus_client.CollectorRegistry())


@pytest.fixture(scope="module")
def server(checkpoint, tokenizer, tmp_path_factory):
    """A module-wide server (max batch 8) over the offloaded tiny Llama: (base URL, service)."""
    model = offload(checkpoint, tmp_path_factory.mktemp("store"))
    service = serving(model, tokenizer)
    with running_server(create_app(service)) as url:
        yield url, service
    service.close()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="unused", max_retries=0, timeout=60)


def greedy(plain, prompt_ids, max_tokens):
    with torch.no_grad():
        out = plain.generate(torch.tensor([prompt_ids]), max_new_tokens=max_tokens, do_sample=False)
    return out[0, len(prompt_ids):].tolist()


def extra(obj, key):
    return (obj.model_extra or {})[key]


# ---- the OpenAI client -----------------------------------------------------------------------------------------


def test_models_health_and_ready(server):
    url, _service = server
    assert httpx.get(f"{url}/v1/models").json()["data"][0]["id"] == NAME
    health = httpx.get(f"{url}/health")
    assert health.status_code == 200 and health.json()["status"] == "serving"
    assert httpx.get(f"{url}/ready").status_code == 200


def test_completion_text_prompt_gives_the_plain_models_greedy_tokens(client, plain, tokenizer):
    prompt = "once upon a time there lived a cat"
    reply = client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0)
    choice = reply.choices[0]
    ids = tokenizer(prompt)["input_ids"]
    expected = greedy(plain, ids, 12)
    assert extra(choice, "token_ids") == expected
    assert choice.text == tokenizer.decode(expected, skip_special_tokens=True)
    assert choice.finish_reason == ("stop" if expected[-1] == tokenizer.eos_token_id else "length")
    assert reply.usage.prompt_tokens == len(ids) and reply.usage.completion_tokens == len(expected)
    assert reply.usage.total_tokens == len(ids) + len(expected)


def test_completion_token_id_prompt_and_streaming_give_the_same_tokens(client, plain, tokenizer):
    ids = [2, 30, 31, 5, 6]
    plain_reply = client.completions.create(model=NAME, prompt=ids, max_tokens=10, temperature=0)
    stream = client.completions.create(model=NAME, prompt=ids, max_tokens=10, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    pieces, tokens, usage, finish = [], [], None, None
    for event in stream:
        if event.choices:
            pieces.append(event.choices[0].text)
            tokens += extra(event.choices[0], "token_ids")
            finish = event.choices[0].finish_reason or finish
        if event.usage is not None:
            usage = event.usage
    assert tokens == extra(plain_reply.choices[0], "token_ids") == greedy(plain, ids, 10)
    assert "".join(pieces) == plain_reply.choices[0].text
    assert finish == plain_reply.choices[0].finish_reason
    assert usage.completion_tokens == len(tokens) and usage.prompt_tokens == len(ids)


def test_chat_completion_uses_the_chat_template_plain_and_streaming(client, plain, tokenizer):
    messages = [{"role": "system", "content": "tell me a story"}, {"role": "user", "content": "hello world"}]
    reply = client.chat.completions.create(model=NAME, messages=messages, max_tokens=8, temperature=0)
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    expected = greedy(plain, ids, 8)
    assert extra(reply.choices[0], "token_ids") == expected
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == tokenizer.decode(expected, skip_special_tokens=True)
    assert reply.usage.prompt_tokens == len(ids)
    text = "".join(event.choices[0].delta.content or "" for event in
                   client.chat.completions.create(model=NAME, messages=messages, max_tokens=8, temperature=0,
                                                  stream=True) if event.choices)
    assert text == reply.choices[0].message.content


def test_a_stop_string_ends_the_text_before_it(client):
    ids = [2, 30, 31, 5, 6]
    full = client.completions.create(model=NAME, prompt=ids, max_tokens=12, temperature=0).choices[0].text
    words = full.split()
    assert len(words) >= 3, full
    stop = " " + words[2]
    cut = client.completions.create(model=NAME, prompt=ids, max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[:full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = "".join(e.choices[0].text for e in client.completions.create(
        model=NAME, prompt=ids, max_tokens=12, temperature=0, stop=stop, stream=True) if e.choices)
    assert streamed == cut.choices[0].text


def test_sampling_with_seed_temperature_and_top_p(client):
    kwargs = dict(model=NAME, prompt=[2, 5, 6], max_tokens=12, temperature=1.3, top_p=0.9)
    texts = [client.completions.create(seed=11, **kwargs).choices[0].text for _ in range(2)]
    assert texts[0] == texts[1]  # alone in the batch, a seed repeats
    assert client.completions.create(model=NAME, prompt=[2, 5, 6], max_tokens=0).choices[0].text == ""


# ---- bad input: OpenAI's error shape, naming the field ---------------------------------------------------------


@pytest.mark.parametrize("path, body, param, words", [
    ("/v1/completions", b'{"model": "tiny", "prompt": "the cat", ', None, "not valid JSON"),
    ("/v1/completions", {"prompt": "the cat", "max_tokens": "12"}, "max_tokens", "integer"),
    ("/v1/completions", {"prompt": "the cat", "max_tokens": -1}, "max_tokens", "greater than or equal to 0"),
    ("/v1/completions", {"prompt": "the cat", "temperature": 3}, "temperature", "less than or equal to 2"),
    ("/v1/completions", {"prompt": "the cat", "top_p": 0}, "top_p", "greater than 0"),
    ("/v1/completions", {"prompt": [2, 5, 4000]}, "prompt", "outside the vocabulary"),
    ("/v1/completions", {"prompt": [2] * 300}, "prompt", "context of 256"),
    ("/v1/completions", {"prompt": [2] * 200, "max_tokens": 100}, "max_tokens", "context of 256"),
    ("/v1/completions", {"max_tokens": 3}, "prompt", "Field required"),
    ("/v1/completions", {"prompt": "the cat", "n": 2}, "n", "less than or equal to 1"),
    ("/v1/completions", {"prompt": "the cat", "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ("/v1/completions", {"prompt": "the cat", "model": "gpt-4"}, "model", "not served here"),
    ("/v1/chat/completions", {"messages": []}, "messages", "at least 1"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, "messages", "role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages", "content"),
])
def test_bad_requests_get_a_4xx_in_openai_error_shape_naming_the_field(server, path, body, param, words):
    url, _ = server
    if isinstance(body, bytes):
        reply = httpx.post(url + path, content=body, headers={"content-type": "application/json"})
    else:
        reply = httpx.post(url + path, json=body)
    assert 400 <= reply.status_code < 500, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and words in error["message"], error
    assert set(error) == {"message", "type", "param", "code"}


def test_unknown_route_is_a_404_in_error_shape(server):
    reply = httpx.get(server[0] + "/v1/nothing")
    assert reply.status_code == 404 and "message" in reply.json()["error"]


def test_the_openai_client_raises_its_typed_errors(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=NAME, prompt=[2, 4000], max_tokens=2)
    assert "outside the vocabulary" in str(caught.value)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="the cat", max_tokens=2)


# ---- clients that go away, faults, loading ---------------------------------------------------------------------


def test_a_client_that_disconnects_mid_stream_frees_its_slot(checkpoint, tokenizer, tmp_path):
    model = offload(checkpoint, tmp_path)
    # 20 ms a step: the abandoned request would run 5 s to its end, so only a cancellation frees the batch sooner.
    slow = model.register_forward_pre_hook(lambda *_: time.sleep(0.02))
    service = serving(model, tokenizer, max_batch=1)
    try:
        with running_server(create_app(service)) as url:
            body = {"model": NAME, "prompt": [2, 5, 6], "max_tokens": 250, "temperature": 0, "stream": True}
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as reply:
                first = next(reply.iter_lines())
                assert first.startswith("data: ")
            # max batch 1: this one runs only once the abandoned request left the batch
            started = time.monotonic()
            after = httpx.post(f"{url}/v1/completions", json={"model": NAME, "prompt": [2, 7], "max_tokens": 3,
                                                               "temperature": 0}, timeout=60)
            assert after.status_code == 200 and len(after.json()["choices"][0]["token_ids"]) == 3
            assert time.monotonic() - started < 3.0  # not after the 250 steps of the abandoned one
            deadline = time.monotonic() + 10
            registry = service.registry
            while registry.get_sample_value("tensorstream_requests_total",
                                            {"model": NAME, "outcome": "cancelled"}) != 1:
                assert time.monotonic() < deadline, "the abandoned request was not cancelled"
                time.sleep(0.05)
            assert registry.get_sample_value("tensorstream_requests_running", {"model": NAME}) == 0
            assert registry.get_sample_value("tensorstream_requests_total", {"model": NAME, "outcome": "length"}) == 1
    finally:
        service.close()
        slow.remove()


def test_a_corrupt_chunk_is_a_503_naming_it_and_the_server_stays_up(checkpoint, tokenizer, plain, tmp_path):
    from store_faults import flip_bit

    model = offload(checkpoint, tmp_path)
    victim = "model.layers.1.self_attn.o_proj.weight"
    with ts.open_model(tmp_path, model._tensorstream_state.model_id) as store:
        offset, data_path = store.info(victim)["raw_file_offset"], store.data_path
    service = serving(model, tokenizer, max_batch=4)
    try:
        with running_server(create_app(service)) as url:
            flip_bit(data_path, offset + 5)
            body = {"model": NAME, "max_tokens": 6, "temperature": 0}
            with concurrent.futures.ThreadPoolExecutor(3) as pool:
                replies = list(pool.map(lambda p: httpx.post(f"{url}/v1/completions", json={**body, "prompt": p},
                                                             timeout=60), [[2, 5], [2, 6, 7], [2, 8, 9, 10]]))
            for reply in replies:
                assert reply.status_code == 503, reply.text
                error = reply.json()["error"]
                assert error["code"] == "CorruptionError" and victim in error["message"], error
            flip_bit(data_path, offset + 5)  # repaired
            health = httpx.get(f"{url}/health").json()
            assert health["status"] == "serving" and "CorruptionError" in health["last_error"]
            again = httpx.post(f"{url}/v1/completions", json={**body, "prompt": [2, 5]}, timeout=60)
            assert again.status_code == 200 and again.json()["choices"][0]["token_ids"] == greedy(plain, [2, 5], 6)
    finally:
        service.close()


def test_health_and_ready_say_why_until_the_model_serves(checkpoint, tmp_path):
    registry = prometheus_client.CollectorRegistry()
    loading = Service(ServeOptions(model=str(checkpoint), storage_path=str(tmp_path)), registry)
    failing = Service(ServeOptions(model=str(tmp_path / "missing"), storage_path=str(tmp_path)),
                      prometheus_client.CollectorRegistry())
    failing.start_loading()
    with running_server(create_app(loading)) as url:
        health = httpx.get(f"{url}/health")
        assert health.status_code == 503 and "loading" in health.json()["reason"]
        assert httpx.get(f"{url}/ready").status_code == 503
        reply = httpx.post(f"{url}/v1/completions", json={"prompt": "the cat"})
        assert reply.status_code == 503 and "not serving yet" in reply.json()["error"]["message"]
    with running_server(create_app(failing)) as url:
        deadline = time.monotonic() + 60
        while failing.state == "loading":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        health = httpx.get(f"{url}/health")
        assert health.status_code == 503 and "missing" in health.json()["reason"]
        assert health.json()["status"] == "failed"


def test_a_checkpoint_loads_in_the_background_verifies_and_serves(checkpoint, plain, tmp_path):
    service = Service(ServeOptions(model=str(checkpoint), storage_path=str(tmp_path), budget_gb=1e-6,
                                   served_name=NAME), prometheus_client.CollectorRegistry())
    service.start_loading()
    try:
        with running_server(create_app(service)) as url:
            deadline = time.monotonic() + 120
            while httpx.get(f"{url}/ready").status_code != 200:
                assert service.state != "failed", service.reason
                assert time.monotonic() < deadline
                time.sleep(0.1)
            reply = httpx.post(f"{url}/v1/completions", json={"model": NAME, "prompt": "the cat sat",
                                                               "max_tokens": 5, "temperature": 0}, timeout=60)
            ids = service.tokenizer("the cat sat")["input_ids"]
            assert reply.json()["choices"][0]["token_ids"] == greedy(plain, ids, 5)
    finally:
        service.close()


# ---- metrics and the guide's load test ------------------------------------------------------------------------


def test_the_deployment_guides_load_test_passes_with_every_request_served(server):
    """The guide's load_test (4 workers, 100 requests), each request a completion over HTTP."""
    url, service = server
    generator = torch.Generator().manual_seed(0)

    def inference_task():
        input_ids = torch.randint(4, service.engine.vocab_size, (20,), generator=generator).tolist()
        reply = httpx.post(f"{url}/v1/completions", json={"model": NAME, "prompt": input_ids, "max_tokens": 4},
                           timeout=120)
        reply.raise_for_status()
        return reply.json()

    start = time.time()
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as executor:
        results = [f.result() for f in [executor.submit(inference_task) for _ in range(100)]]
    report = {"requests": 100, "total_time": time.time() - start,
              "success_rate": sum(1 for r in results if r["choices"][0]["finish_reason"]) / 100}
    assert report["success_rate"] == 1.0


def test_metrics_has_the_serving_and_engine_families_for_the_model(server, client):
    url, _ = server
    client.completions.create(model=NAME, prompt=[2, 5], max_tokens=2)
    text = httpx.get(f"{url}/metrics").text
    for family in ("tensorstream_requests_total", "tensorstream_prompt_tokens_total",
                   "tensorstream_generation_tokens_total", "tensorstream_time_to_first_token_seconds_bucket",
                   "tensorstream_batch_size_bucket", "tensorstream_read_bytes_total",
                   "tensorstream_block_load_seconds_bucket", "tensorstream_budget_bytes"):
        assert family in text, family
    from prometheus_client.parser import text_string_to_metric_families

    samples = {s.name: s for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples["tensorstream_generation_tokens_total"].labels["model"] == NAME
    assert samples["tensorstream_generation_tokens_total"].value >= 2
