"""Continuous batching: rows of every adapter kind decode together, join a running batch
between steps and leave it, and each row's tokens equal PEFT's generate alone."""

from __future__ import annotations

from pathlib import Path

import pytest
from carpool.workers.after_training.fused_inference import BASE, Sampling
from carpool.workers.serving.continuous_batch import FINISHED
from carpool.workers.serving.served_model import AdapterRefusedError, PromptError, ServedModel
from carpool.workers.serving.text_stream import TextStream

from tests.helpers.finished_adapters import adapters_of_each_kind, peft_greedy

PROMPTS = [
    {"prompt": "Question: what is 3 plus 4?"},
    {"prompt": "the quick"},
    {"prompt": "looked at the mat and the cat sat on a"},
    {"messages": [{"role": "user", "content": "say hello 7"}]},
]


@pytest.fixture(scope="module")
def adapters(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return adapters_of_each_kind(tiny_base, tmp_path_factory.mktemp("adapters"))


@pytest.fixture(scope="module")
def served(tiny_base: Path, adapters: dict[str, Path]):
    model = ServedModel(str(tiny_base), device="cpu", max_rows=64)
    for name, path in adapters.items():
        model.load(name, path)
    yield model
    model.close()


class Collected:
    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.finished = False

    def __call__(self, token: int | None) -> None:
        if token is FINISHED:
            self.finished = True
        else:
            self.tokens.append(token)


def test_rows_joining_a_running_batch_equal_peft_alone(
    tiny_base: Path, adapters: dict[str, Path], served: ServedModel
) -> None:
    decoder = served.decoder
    names = [*adapters, BASE]
    jobs = []  # (adapter, prompt, max_new, collector)
    # Drive the decoder by hand (the thread only steps when it finds rows; these are
    # submitted under the step lock, so each join happens exactly where written).
    with decoder.between_steps:
        first = [(n, PROMPTS[i % 4], 10) for i, n in enumerate(names)]
        for adapter, record, max_new in first:
            jobs.append((adapter, served.prompt(record), max_new, Collected()))
    rows = []
    for adapter, prompt, max_new, got in jobs:
        rows.append(served.start(adapter, prompt, Sampling(max_new_tokens=max_new), got, "k"))
    # Later rows join while the first ones run: other prompt lengths (longer and shorter
    # than the running cache), every adapter again, and one row cancelled on the way.
    late = []
    for step in range(3):
        decoder_wait_for_tokens(jobs, step + 1)
        for i, n in enumerate(reversed(names)):
            prompt = served.prompt(PROMPTS[(i + step + 1) % 4])
            got = Collected()
            late.append((n, prompt, 6 + step, got))
            served.start(n, prompt, Sampling(max_new_tokens=6 + step), got, "k")
    cancelled = Collected()
    row = served.start(
        "lora", served.prompt(PROMPTS[0]), Sampling(max_new_tokens=50), cancelled, ""
    )
    served.cancel(row)
    for *_, got in [*jobs, *late]:
        _wait(lambda got=got: got.finished)
    _wait(lambda: cancelled.finished)
    assert len(cancelled.tokens) < 50
    eos = served.tokenizer.eos_token_id
    for adapter, prompt, max_new, got in [*jobs, *late]:
        want, _ = peft_greedy(tiny_base, adapters.get(adapter), list(prompt), max_new, eos)
        assert got.tokens == want, (adapter, prompt)
    assert len({tuple(j[3].tokens) for j in jobs}) > 2  # the adapters change the text
    assert not decoder.rows and decoder.step() is False


def decoder_wait_for_tokens(jobs, n: int) -> None:
    _wait(lambda: all(len(got.tokens) >= n or got.finished for *_, got in jobs))


def _wait(condition, timeout_s: float = 60.0) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_sampled_rows_depend_on_seed_prompt_and_adapter_only(served: ServedModel) -> None:
    prompt = served.prompt(PROMPTS[1])
    sampling = Sampling(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=5)
    alone = Collected()
    served.start("vera", prompt, sampling, alone, "key")
    _wait(lambda: alone.finished)
    crowd = [Collected() for _ in range(6)]
    for i, got in enumerate(crowd):
        served.start("dora", served.prompt(PROMPTS[i % 4]), sampling, got, str(i))
    beside = Collected()
    served.start("vera", prompt, sampling, beside, "key")
    _wait(lambda: beside.finished and all(c.finished for c in crowd))
    assert alone.tokens == beside.tokens


def test_an_adapter_retires_only_when_its_rows_are_done(served: ServedModel, adapters) -> None:
    served.load("again", adapters["lora"])
    got = Collected()
    with served.decoder.between_steps:  # the row is waiting when the retire comes
        served.start("again", served.prompt(PROMPTS[2]), Sampling(max_new_tokens=5), got, "")
    served.unload("again")
    _wait(lambda: got.finished)
    assert got.tokens
    _wait(lambda: "again" not in served.adapters)


def test_refusals_name_what_is_wrong(served: ServedModel, tmp_path: Path, adapters) -> None:
    import shutil

    other = tmp_path / "other"
    shutil.copytree(adapters["lora"], other)
    (other / "carpool_adapter.json").write_text(
        '{"base_model": "org/elsewhere", "base_fingerprint": "sha256:' + "0" * 64 + '"}'
    )
    with pytest.raises(AdapterRefusedError, match="org/elsewhere"):
        served.load("other", other)
    with pytest.raises(PromptError, match="context"):
        served.check_length(served.prompt(PROMPTS[0]), served.context_length)


def test_text_stream_cuts_at_a_stop_string_and_holds_back_its_start(served) -> None:
    tok = served.tokenizer
    ids = tok("the cat sat on the mat", add_special_tokens=False)["input_ids"]
    stream = TextStream(tok, stops=["on the"])
    pieces = [stream.push(t) for t in ids]
    assert stream.stopped
    assert "".join(pieces) + stream.finish() == tok.decode(ids).split("on the")[0]
    plain = TextStream(tok)
    assert "".join(plain.push(t) for t in ids) + plain.finish() == tok.decode(ids)


def test_a_qlora_adapter_serves_on_its_4bit_base_as_generate_decodes_it(
    tiny_base: Path, datasets: dict[str, Path], tmp_path: Path
) -> None:
    """Served on the base loaded in 4 bits as it was trained (the kernel choice of
    `carpool eval` and `generate`): rows joining a running batch decode as `generate`'s."""
    pytest.importorskip("bitsandbytes")
    from carpool.workers.after_training.fused_inference import FusedAdapters, GenerationRequest
    from carpool.workers.spec.job_spec import AdapterSpec, QuantizationSpec
    from carpool.workers.training.rounds import export_job

    from tests.helpers.jobs import changed, job
    from tests.helpers.variants import train_fused

    nf4 = QuantizationSpec(bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype="float32")
    spec = job("q", tiny_base, datasets["text"], AdapterSpec(r=4, target_modules="all-linear"),
               batch_size=4, learning_rate=1e-2, max_seq_length=12, max_steps=3)  # fmt: skip
    spec = changed(spec, base_quantization=nf4)
    adapter = export_job(
        train_fused(tiny_base, [spec], quantization=nf4).finished["q"], tmp_path / "q"
    )
    model = ServedModel(str(tiny_base), quantization=nf4, device="cpu")
    try:
        model.load("q", adapter)
        prompts = [model.prompt(p) for p in PROMPTS]
        got = [Collected() for _ in prompts]
        with model.decoder.between_steps:  # the first row starts alone; the others join it
            model.start("q", prompts[0], Sampling(max_new_tokens=8), got[0], "")
        _wait(lambda: len(got[0].tokens) >= 2 or got[0].finished)
        for prompt, collected in zip(prompts[1:], got[1:], strict=True):
            model.start("q", prompt, Sampling(max_new_tokens=8), collected, "")
        _wait(lambda: all(c.finished for c in got))
        fused = FusedAdapters(str(tiny_base), {"q": adapter}, quantization=nf4, device="cpu")
        requests = [GenerationRequest("q", p, str(i)) for i, p in enumerate(prompts)]
        want = fused.generate(requests, Sampling(max_new_tokens=8), batch_rows=1)
        assert [c.tokens for c in got] == want
    finally:
        model.close()
