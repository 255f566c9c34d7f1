"""`carpool serve` on the suite's Ray head, asked with OpenAI's own client.

One endpoint for the module (Serve's actors are slow to start): adapters of each kind
from directories, then jobs trained while it runs. Completions are compared with
PEFT's `generate` of each adapter alone."""

from __future__ import annotations

import json
import shutil
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
import torch
from carpool.orchestrator.cli.main import main
from carpool.orchestrator.runtime.client import Client
from carpool.orchestrator.runtime.local_ray import free_port
from carpool.workers.base.base_model import load_tokenizer
from carpool.workers.data.dataset import prompt_ids

from tests.helpers.cluster import carpool_cluster, wait_for, write_job
from tests.helpers.finished_adapters import adapters_of_each_kind, float32_base, peft_greedy

pytestmark = pytest.mark.integration

CAP = 5  # adapters a replica holds: the five directory adapters fit; more evict
PROMPTS = ["the quick", "Question: what is 3 plus 4?", "looked at the mat and the cat sat on a"]


@dataclass
class Endpoint:
    client: Client
    url: str
    key: str
    adapters: dict[str, Path]
    root: Path

    def openai(self, key: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url, api_key=key or self.key, max_retries=0)

    def post(self, path: str, body: bytes, key: str | None = None) -> tuple[int, dict]:
        """A raw request: the status and the JSON body, errors included."""
        request = urllib.request.Request(
            self.url + path, data=body, method="POST",
            headers={"Content-Type": "application/json",
                     **({"Authorization": f"Bearer {key}"} if key is not None else {})},
        )  # fmt: skip
        try:
            with urllib.request.urlopen(request, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def endpoint(
    shared_ray_head: str, tiny_base: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Endpoint]:
    root = tmp_path_factory.mktemp("serve")
    adapters = adapters_of_each_kind(tiny_base, root / "adapters")
    adapters["mismatch"] = root / "adapters" / "mismatch"  # its record is changed later
    shutil.copytree(adapters["lora"], adapters["mismatch"])
    port = free_port()
    serve = {"port": port, "max_adapters_per_replica": CAP, "max_completion_tokens": 64}
    with carpool_cluster(root, shared_ray_head, serve=serve) as client:
        named = [f"{name}={path}" for name, path in adapters.items()]
        state = str(client.state_dir)
        assert main(["serve", "--state-dir", state, "--base", str(tiny_base), *named]) == 0
        key = (client.state_dir / "serve" / "api_key").read_text().strip()
        assert (client.state_dir / "serve" / "api_key").stat().st_mode & 0o777 == 0o600
        yield Endpoint(client, f"http://127.0.0.1:{port}/v1", key, adapters, root)
    assert not (client.state_dir / "serve" / "serving.json").exists()  # down removed it


_references: dict[tuple, str] = {}


def peft_text(tiny_base: Path, adapter: Path | None, record: dict, max_new: int) -> str:
    """PEFT's greedy `generate` of the adapter alone, as text."""
    key = (str(tiny_base), str(adapter), json.dumps(record), max_new)
    if key not in _references:
        tok = load_tokenizer(str(tiny_base))
        prompt = prompt_ids(record, tok)
        tokens, _ = peft_greedy(tiny_base, adapter, prompt, max_new, tok.eos_token_id)
        _references[key] = tok.decode(tokens, skip_special_tokens=True)
    return _references[key]


def complete(api: openai.OpenAI, model: str, prompt: str, max_tokens: int = 10, **kw) -> str:
    r = api.completions.create(
        model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, **kw
    )
    return r.choices[0].text


KINDS = ["lora", "rslora", "dora", "vera", "adalora"]


def test_concurrent_greedy_completions_equal_peft_alone(endpoint: Endpoint, tiny_base: Path):
    api = endpoint.openai()
    asks = [(m, p) for p in PROMPTS for m in [*KINDS, "base"]]
    with ThreadPoolExecutor(len(asks)) as pool:  # all at once: they decode in one batch
        got = list(pool.map(lambda a: complete(api, *a), asks))
    for (model, prompt), text in zip(asks, got, strict=True):
        adapter = endpoint.adapters.get(model)
        assert text == peft_text(tiny_base, adapter, {"prompt": prompt}, 10), model
    assert len(set(got)) > len(PROMPTS)  # the adapters change the text
    r = api.completions.create(model="dora", prompt=PROMPTS[0], max_tokens=10, temperature=0)
    assert r.usage.prompt_tokens == len(
        prompt_ids({"prompt": PROMPTS[0]}, load_tokenizer(str(tiny_base)))
    )
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.model == "dora" and r.choices[0].finish_reason in ("stop", "length")


def test_streaming_gives_the_same_text_and_ends_with_done(endpoint: Endpoint, tiny_base: Path):
    api = endpoint.openai()
    for model in ["vera", "adalora"]:
        pieces = api.completions.create(
            model=model, prompt=PROMPTS[1], max_tokens=10, temperature=0, stream=True
        )
        assert "".join(c.choices[0].text for c in pieces) == complete(api, model, PROMPTS[1])
    messages = [{"role": "user", "content": "say hello 7"}]
    chat = api.chat.completions.create(
        model="lora", messages=messages, max_tokens=10, temperature=0
    )
    want = peft_text(tiny_base, endpoint.adapters["lora"], {"messages": messages}, 10)
    assert chat.choices[0].message.content == want
    stream = api.chat.completions.create(
        model="lora", messages=messages, max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
    body = json.dumps({"model": "lora", "prompt": "the", "max_tokens": 3, "stream": True})
    request = urllib.request.Request(
        endpoint.url + "/completions", data=body.encode(), method="POST",
        headers={"Authorization": f"Bearer {endpoint.key}", "Content-Type": "application/json"},
    )  # fmt: skip
    lines = urllib.request.urlopen(request, timeout=60).read().decode().strip().splitlines()
    assert lines[-1] == "data: [DONE]"


def test_models_lists_bases_and_adapters_with_parent_and_root(endpoint: Endpoint, tiny_base):
    models = {m.id: m for m in endpoint.openai().models.list().data}
    assert str(tiny_base) in models
    lora = models["lora"].model_dump()
    assert lora["parent"] == str(tiny_base)
    assert lora["root"] == str(endpoint.adapters["lora"].resolve())
    assert lora["version"] in models  # the versioned id, a hash of the files
    assert lora["version"].startswith("lora-")


def test_bad_requests_get_their_status_and_the_next_good_one_succeeds(
    endpoint: Endpoint, tiny_base: Path
):
    context = json.loads((tiny_base / "config.json").read_text())["max_position_embeddings"]
    ok = json.dumps({"model": "lora", "prompt": "the", "max_tokens": 2}).encode()
    cases = [
        (ok, None, 401),
        (ok, "wrong-key", 401),
        (b'{"model": "lora", "prompt": ', endpoint.key, 400),
        (json.dumps({"model": "nope", "prompt": "x"}).encode(), endpoint.key, 404),
        (json.dumps({"model": "lora", "prompt": "x", "n": 2}).encode(), endpoint.key, 400),
        (json.dumps({"model": "lora", "prompt": "x", "logprobs": 2}).encode(), endpoint.key, 400),
        (json.dumps({"model": "lora", "prompt": "x", "echo": True}).encode(), endpoint.key, 400),
        (json.dumps({"model": "lora", "prompt": "x", "presence_penalty": 1}).encode(), endpoint.key, 400),
        (json.dumps({"model": "lora", "prompt": 5}).encode(), endpoint.key, 400),
        (json.dumps({"model": "lora", "prompt": "x", "max_tokens": 65}).encode(), endpoint.key, 400),
        (json.dumps({"model": "lora", "prompt": "the " * context, "max_tokens": 8}).encode(), endpoint.key, 400),
    ]  # fmt: skip
    for body, key, status in cases:
        got, error = endpoint.post("/completions", body, key)
        assert got == status, (body[:60], error)
        assert error["error"]["message"], error
    _, error = endpoint.post("/completions", cases[4][0], endpoint.key)
    assert error["error"]["param"] == "n"
    _, error = endpoint.post("/completions", cases[-1][0], endpoint.key)
    assert "context" in error["error"]["message"]
    status, good = endpoint.post("/completions", ok, endpoint.key)
    assert status == 200 and good["choices"][0]["text"] is not None


def test_an_adapter_for_another_base_is_refused_and_the_rest_serve(endpoint: Endpoint):
    record = {"base_model": "org/elsewhere", "base_fingerprint": "sha256:" + "0" * 64}
    (endpoint.adapters["mismatch"] / "carpool_adapter.json").write_text(json.dumps(record))
    body = json.dumps({"model": "mismatch", "prompt": "the", "max_tokens": 2}).encode()
    status, error = endpoint.post("/completions", body, endpoint.key)
    assert status == 400
    assert "org/elsewhere" in error["error"]["message"]
    assert complete(endpoint.openai(), "lora", "the", 2) is not None


def test_jobs_answer_once_they_succeed_and_a_retrain_moves_the_alias(
    endpoint: Endpoint, tiny_base: Path, datasets: dict[str, Path]
):
    client, api = endpoint.client, endpoint.openai()
    first_spec = write_job(endpoint.root / "j1.yaml", "support", tiny_base, datasets["text"], 3)
    (first,) = client.submit([first_spec])
    client.wait([first], timeout=300)
    # Told by the controller: it answers by its name at once (a moment for the news).
    text = wait_for(lambda: _answer(api, "support"), timeout=10, what="support served")
    client.fetch(first, endpoint.root / "first")
    assert text == peft_text(tiny_base, endpoint.root / "first", {"prompt": "the quick"}, 10)
    second_spec = write_job(
        endpoint.root / "j2.yaml", "support", tiny_base, datasets["text"], 6, learning_rate=5e-2
    )
    (second,) = client.submit([second_spec])
    client.wait([second], timeout=300)
    client.fetch(second, endpoint.root / "second")
    new = peft_text(tiny_base, endpoint.root / "second", {"prompt": "the quick"}, 10)
    old = peft_text(tiny_base, endpoint.root / "first", {"prompt": "the quick"}, 10)
    assert new != old  # the retrain changed the adapter's answer
    wait_for(lambda: _answer(api, "support") == new, timeout=10, what="alias on the retrain")
    assert complete(api, first, "the quick") == old  # the old version, by its id
    models = {m.id: m.model_dump() for m in api.models.list().data}
    assert models["support"]["version"] == second
    assert models[first]["root"] == f"job {first}"


def _answer(api: openai.OpenAI, model: str) -> str | None:
    try:
        return complete(api, model, "the quick")
    except openai.NotFoundError:
        return None


def test_eviction_at_the_cap_and_reload(endpoint: Endpoint, tiny_base: Path) -> None:
    from ray import serve

    api = endpoint.openai()
    names = KINDS + ["support"]  # six adapters through a replica that holds five
    for _ in range(2):
        for name in names:
            complete(api, name, PROMPTS[2])
    key = next(k for k in serve.status().applications["carpool"].deployments if k != "ingress")
    server = serve.get_deployment_handle(key, app_name="carpool")
    loaded = server.loaded.remote().result(timeout_s=30)
    assert len(loaded) <= CAP
    for name in KINDS:  # evicted and reloaded, each still itself
        want = peft_text(tiny_base, endpoint.adapters[name], {"prompt": PROMPTS[2]}, 10)
        assert complete(api, name, PROMPTS[2]) == want, name


def test_per_adapter_metrics_reach_prometheus(endpoint: Endpoint) -> None:
    """Labelled by adapter version (`vera-<hash>`), after the eviction test above."""
    import ray

    api = endpoint.openai()
    node = next(n for n in ray.nodes() if n["Alive"])
    url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"

    def seen(name: str, adapter: str) -> bool:
        complete(api, "vera", "the", 2)  # fresh figures each time Ray exports
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        label = f'adapter="{adapter}-'
        return any(x.startswith(name + "{") and label in x for x in text.splitlines())

    for name, adapter in [
        ("ray_carpool_serve_requests_total", "vera"),
        ("ray_carpool_serve_generated_tokens_total", "vera"),
        ("ray_carpool_serve_time_to_first_token_s_bucket", "vera"),
        ("ray_carpool_serve_queue_time_s_bucket", "vera"),
        ("ray_carpool_serve_adapter_loads_total", "dora"),
        ("ray_carpool_serve_adapter_evictions_total", "lora"),
    ]:
        wait_for(lambda n=name, a=adapter: seen(n, a), timeout=60, what=f"{name} of {adapter}")


def test_a_second_base_gets_its_own_deployment_behind_the_ingress(
    endpoint: Endpoint, tiny_base: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """`carpool serve` again, with another base: a deployment per base, routed by model."""
    import ray
    from carpool.workers.base.tiny_base import build_tiny_base
    from peft import LoraConfig, get_peft_model

    other = build_tiny_base(tmp_path_factory.mktemp("other-base"), hidden_size=32, seed=7)
    torch.manual_seed(3)
    peft_model = get_peft_model(
        float32_base(other), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)
    )
    peft_model.save_pretrained(endpoint.root / "elsewhere")
    # Its replica needs the CPU the training group held: the group stops when idle.
    wait_for(lambda: ray.available_resources().get("CPU", 0) >= 1, timeout=120, what="a CPU")
    state = str(endpoint.client.state_dir)
    assert main(["serve", "--state-dir", state, "--base", str(other),
                 f"elsewhere={endpoint.root / 'elsewhere'}"]) == 0  # fmt: skip
    api = endpoint.openai()
    want = peft_text(other, endpoint.root / "elsewhere", {"prompt": PROMPTS[0]}, 10)
    assert complete(api, "elsewhere", PROMPTS[0]) == want
    assert complete(api, str(other), PROMPTS[0]) == peft_text(
        other, None, {"prompt": PROMPTS[0]}, 10
    )
    second = peft_text(tiny_base, endpoint.root / "second", {"prompt": "the quick"}, 10)
    assert complete(api, "support", "the quick") == second  # the queue's, on its own base
    models = {m.id: m.model_dump() for m in api.models.list().data}
    assert models["elsewhere"]["parent"] == str(other)
    assert models["support"]["parent"] == str(tiny_base)
    with pytest.raises(openai.NotFoundError):  # `base` is ambiguous with two bases
        complete(api, "base", "the")


def test_status_shows_the_endpoint_and_serve_stop_removes_it(
    endpoint: Endpoint, capsys: pytest.CaptureFixture[str]
) -> None:
    """Last in the module: it stops the endpoint the others share."""
    state = str(endpoint.client.state_dir)
    assert main(["status", "--state-dir", state]) == 0
    assert f"serving: {endpoint.url} (key in " in capsys.readouterr().out
    assert main(["serve", "--stop", "--state-dir", state]) == 0
    assert "serving stopped" in capsys.readouterr().out
    assert main(["status", "--state-dir", state]) == 0
    assert "serving:" not in capsys.readouterr().out
    with pytest.raises(openai.APIConnectionError):
        endpoint.openai().models.list()
