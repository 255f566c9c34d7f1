"""The serving catalog (versions, aliases, DyLoRA ranks, bases) and OpenAI request checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from carpool.orchestrator.control.operator_config import OperatorConfigError, load_operator_config
from carpool.orchestrator.serving.adapter_catalog import (
    AdapterCatalog,
    AdapterVersion,
    UnknownModelError,
    base_key,
    directory_hash,
)
from carpool.orchestrator.serving.adapter_sources import directory_version
from carpool.orchestrator.serving.deployment import ensure_key
from carpool.orchestrator.serving.openai_protocol import (
    ChatRequest,
    CompletionRequest,
    RequestError,
    parse_request,
)


def _adapter(root: Path, name: str, content: str = "w") -> Path:
    path = root / name
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text("{}")
    (path / "adapter_model.safetensors").write_text(content)
    return path


def _version(catalog: AdapterCatalog, vid: str, name: str, path: Path, created: float):
    base = catalog.add_base("org/base", None)
    catalog.add(AdapterVersion(vid, name, base.key, str(path), f"job {vid}", created))


def test_the_bare_name_follows_the_newest_version(tmp_path: Path) -> None:
    catalog = AdapterCatalog()
    old, new = _adapter(tmp_path, "old"), _adapter(tmp_path, "new")
    _version(catalog, "support-00000001", "support", old, created=1.0)
    _version(catalog, "support-00000002", "support", new, created=2.0)
    _version(catalog, "support-00000000", "support", old, created=0.5)  # told late: older
    base, version = catalog.resolve("support")
    assert version.id == "support-00000002" and base.base_model == "org/base"
    assert catalog.resolve("support-00000001")[1].path == str(old)
    assert catalog.resolve("org/base") == (base, None)
    assert catalog.resolve("base") == (base, None)  # one base served
    with pytest.raises(UnknownModelError, match="nope"):
        catalog.resolve("nope")
    listed = {m["id"]: m for m in catalog.models()}
    assert listed["support"]["version"] == "support-00000002"
    assert listed["support-00000001"]["parent"] == "org/base"
    assert listed["support-00000001"]["root"] == "job support-00000001"


def test_base_alias_needs_one_base_and_keys_differ_by_quantization() -> None:
    catalog = AdapterCatalog()
    catalog.add_base("org/base", None)
    catalog.add_base("org/base", {"bnb_4bit_quant_type": "nf4"})
    assert len(catalog.bases) == 2
    assert base_key("org/base", None) != base_key("org/base", {"bnb_4bit_quant_type": "nf4"})
    with pytest.raises(UnknownModelError):
        catalog.resolve("base")


def test_a_dylora_adapter_serves_each_exported_rank(tmp_path: Path) -> None:
    path = _adapter(tmp_path, "dy")
    for b in (2, 4):
        _adapter(path, f"rank-{b}")
    record = {"adapter_kind": "dylora", "dylora_rank": 8, "dylora_ranks": [2, 4, 8]}
    (path / "carpool_adapter.json").write_text(json.dumps(record))
    catalog = AdapterCatalog()
    _version(catalog, "dy-00000001", "dy", path, created=1.0)
    assert catalog.resolve("dy")[1].path == str(path)
    assert catalog.resolve("dy@rank-2")[1].path == str(path / "rank-2")
    assert catalog.resolve("dy-00000001@rank-4")[1].path == str(path / "rank-4")


def test_a_directory_version_is_a_hash_of_its_files(tmp_path: Path) -> None:
    one, same, other = (_adapter(tmp_path, n, c) for n, c in [("a", "w"), ("b", "w"), ("c", "v")])
    assert directory_hash(one) == directory_hash(same) != directory_hash(other)
    version = directory_version("mine", one, "base-x")
    assert version.id == f"mine-{directory_hash(one)}" and version.root == str(one.resolve())


def test_unsupported_and_malformed_fields_are_refused_by_name() -> None:
    good = {"model": "m", "prompt": "hi", "max_tokens": 3, "stop": ["\n"], "seed": 1}
    parsed = parse_request(good, CompletionRequest)
    assert parsed.stops == ["\n"] and parsed.requested_tokens(16) == 3
    for field, value in [("n", 2), ("logprobs", 1), ("echo", True), ("best_of", 3),
                         ("presence_penalty", 0.5), ("frequency_penalty", -1), ("logit_bias", {"1": 2})]:  # fmt: skip
        with pytest.raises(RequestError) as e:
            parse_request({**good, field: value}, CompletionRequest)
        assert e.value.status == 400 and e.value.param == field
    for body, param in [({**good, "temperature": 3}, "temperature"), ({"model": "m"}, "prompt"),
                        ({**good, "stop": ["a"] * 5}, "stop"), ({**good, "max_tokens": 0}, "max_tokens")]:  # fmt: skip
        with pytest.raises(RequestError) as e:
            parse_request(body, CompletionRequest)
        assert e.value.param == param, body
    # No-op values of unsupported fields pass, as OpenAI's clients send some by default.
    assert parse_request(
        {**good, "n": 1, "echo": False, "logit_bias": {}, "logprobs": False}, CompletionRequest
    )
    chat = parse_request(
        {"model": "m", "messages": [{"role": "user", "content": "x"}]}, ChatRequest
    )
    assert chat.record() == {"messages": [{"role": "user", "content": "x"}]}
    with pytest.raises(RequestError, match="messages"):
        parse_request({"model": "m", "messages": []}, ChatRequest)
    assert RequestError(401, "no").body()["error"]["type"] == "authentication_error"


def test_the_serve_section_is_checked_and_the_key_made_private(tmp_path: Path) -> None:
    config = tmp_path / "operator.yaml"
    config.write_text("serve:\n  port: 70000\n  replicas: 0\n  colour: red\n")
    with pytest.raises(OperatorConfigError) as e:
        load_operator_config(config)
    for field in ("serve.port", "serve.replicas", "serve.colour: unknown field"):
        assert field in str(e.value)
    config.write_text(f"state_dir: {tmp_path}\nserve:\n  host: 0.0.0.0\n")
    loaded = load_operator_config(config)
    assert loaded.serve.host == "0.0.0.0" and loaded.serve.port == 8000
    key = ensure_key(loaded.serve_key_file())
    assert key == tmp_path / "serve" / "api_key"
    assert key.stat().st_mode & 0o777 == 0o600 and len(key.read_text().strip()) > 30
    first = key.read_text()
    assert ensure_key(key).read_text() == first  # kept, not replaced
