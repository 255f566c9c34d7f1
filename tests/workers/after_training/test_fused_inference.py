"""Finished adapters used together: fused eval and generation equal PEFT, one adapter at a time."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from carpool.workers.after_training.fused_inference import (
    BASE,
    FusedAdapters,
    GenerationRequest,
    Sampling,
)
from carpool.workers.base.base_model import load_tokenizer
from carpool.workers.data.dataset import load_dataset, prompt_ids
from peft import PeftModel

from tests.helpers.finished_adapters import (
    adapters_of_each_kind,
    float32_base,
    peft_greedy,
    reference_eval_loss,
)


@pytest.fixture(scope="module")
def adapters(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return adapters_of_each_kind(tiny_base, tmp_path_factory.mktemp("adapters"))


def _peft(tiny_base: Path, adapter: Path | None) -> torch.nn.Module:
    base = float32_base(tiny_base)
    return base if adapter is None else PeftModel.from_pretrained(base, adapter).eval()


def test_fused_eval_equals_peft_alone(
    tiny_base: Path, adapters: dict[str, Path], datasets: dict[str, Path]
) -> None:
    fused = FusedAdapters(str(tiny_base), adapters, include_base=True, micro_batch_tokens=300)
    data = load_dataset(datasets["prompt_completion"], "auto", fused.tokenizer, 64)
    results = fused.evaluate(data)
    assert [r.loss for r in results] == sorted(r.loss for r in results)
    assert {r.name for r in results} == {*adapters, BASE}
    for result in results:
        model = _peft(tiny_base, adapters.get(result.name))
        loss, count = reference_eval_loss(model, data)
        assert result.tokens == count
        assert abs(result.loss - loss) <= 1e-5 * loss, result.name
    # The adapters matter: no two losses are the same.
    assert len({round(r.loss, 6) for r in results}) == len(results)


PROMPTS = [
    {"prompt": "Question: what is 3 plus 4?"},
    {"prompt": "the quick"},
    {"prompt": "looked at the mat and the cat sat on a"},
    {"messages": [{"role": "user", "content": "say hello 7"}]},
]


def test_mixed_adapter_greedy_generation_equals_peft_generate(
    tiny_base: Path, adapters: dict[str, Path]
) -> None:
    fused = FusedAdapters(str(tiny_base), adapters, include_base=True)
    tok = load_tokenizer(str(tiny_base))
    names = [*adapters, BASE]
    # Every prompt through every adapter, in one interleaved list: batches mix adapters
    # and prompt lengths (left padding), and 5 rows per batch split adapters across batches.
    requests = [
        GenerationRequest(name, tuple(prompt_ids(p, tok)), str(i))
        for i, p in enumerate(PROMPTS)
        for name in names
    ]
    got = fused.generate(requests, Sampling(max_new_tokens=12), batch_rows=5)
    smallest_gap = float("inf")
    for request, tokens in zip(requests, got, strict=True):
        want, gap = peft_greedy(
            tiny_base, adapters.get(request.adapter), list(request.prompt_ids), 12, tok.eos_token_id
        )
        smallest_gap = min(smallest_gap, gap)
        assert tokens == want, (request.adapter, request.key)
    assert smallest_gap > 1e-4  # no near-tie decided the comparison
    assert len({tuple(t) for t in got}) > len(PROMPTS)  # the adapters change the text


def test_sampling_depends_on_seed_prompt_and_adapter_only(
    tiny_base: Path, adapters: dict[str, Path]
) -> None:
    fused = FusedAdapters(str(tiny_base), adapters)
    tok = load_tokenizer(str(tiny_base))
    one = GenerationRequest("lora", tuple(prompt_ids(PROMPTS[1], tok)), "1")
    others = [GenerationRequest(n, tuple(prompt_ids(PROMPTS[2], tok)), "2") for n in adapters]
    sampling = Sampling(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=3)
    alone = fused.generate([one], sampling)[0]
    beside = fused.generate([*others, one], sampling)[-1]
    assert alone == beside
    reseeded = Sampling(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=4)
    draws = {tuple(fused.generate([one], reseeded)[0]), tuple(alone)}
    assert len(draws) == 2
