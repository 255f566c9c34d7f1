"""The Ray Serve deployment of one (base, quantization): replicas that decode.

Each replica holds the base once and at most `max_adapters_per_replica` adapters,
least recently used first out (Ray Serve's multiplexing, whose model ids are
adapter versions: the router prefers a replica that already holds a request's
adapter). Its own decode loop (`ContinuousDecoder`) batches rows of every adapter
it holds; Serve's `@serve.batch` is not used, as it splits batches by model id.

`generate` streams dicts to the ingress: first `{"prompt_tokens": n}` (or
`{"error": ...}` for a request refused before decoding), then `{"text": ...}`
pieces, then `{"finish_reason": ..., "completion_tokens": n}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import AsyncIterator

from ray import serve
from ray.util import metrics as ray_metrics

log = logging.getLogger("carpool.serve")


class _Metrics:
    """Per-adapter serving metrics on Ray's Prometheus endpoint (label `adapter`)."""

    def __init__(self, base_key: str) -> None:
        tags = ("adapter", "base")
        self.base = base_key
        self.requests = ray_metrics.Counter("carpool_serve_requests_total", "requests", tags)
        self.prompt_tokens = ray_metrics.Counter(
            "carpool_serve_prompt_tokens_total", "prompt tokens", tags
        )
        self.generated_tokens = ray_metrics.Counter(
            "carpool_serve_generated_tokens_total", "generated tokens", tags
        )
        bounds = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]
        self.ttft = ray_metrics.Histogram(
            "carpool_serve_time_to_first_token_s", "time to first token", bounds, tags
        )
        self.latency = ray_metrics.Histogram(
            "carpool_serve_request_latency_s", "end-to-end latency", bounds, tags
        )
        self.queue_time = ray_metrics.Histogram(
            "carpool_serve_queue_time_s", "waiting before joining the decode batch", bounds, tags
        )
        self.loads = ray_metrics.Counter("carpool_serve_adapter_loads_total", "adapter loads", tags)
        self.evictions = ray_metrics.Counter(
            "carpool_serve_adapter_evictions_total", "adapters evicted (LRU)", tags
        )

    def tags(self, adapter: str) -> dict[str, str]:
        return {"adapter": adapter, "base": self.base}


class _Held:
    """A loaded adapter, as Serve's multiplexer holds it: evicting it retires it."""

    def __init__(self, server: BaseServerCore, version: str) -> None:
        self.server, self.version, self._retired = server, version, False

    def __del__(self) -> None:  # Serve calls it on eviction; Python may again at collection
        if not self._retired:
            self._retired = True
            self.server.model.unload(self.version)
            self.server.metrics.evictions.inc(tags=self.server.metrics.tags(self.version))


class BaseServerCore:
    """The replica's work; `base_server_deployment` wraps it with the multiplexer."""

    def __init__(
        self, base_key: str, base_model: str, quantization: dict | None, options: dict
    ) -> None:
        import torch
        from carpool.workers.serving.served_model import ServedModel
        from carpool.workers.spec.job_spec import QuantizationSpec

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
        torch.set_num_threads(options["threads"])  # the CPUs Serve reserved for this replica
        self.model = ServedModel(
            base_model,
            quantization=None if quantization is None else QuantizationSpec(**quantization),
            device=options.get("device"),
            adapter_math=options.get("adapter_math", "auto"),
            max_rows=options["max_batch_rows"],
            trust_remote_code=options.get("trust_remote_code", False),
        )
        self.base_key = base_key
        # A streamed request's pieces after its first go out at most this often.
        self.stream_interval_s: float = options["stream_interval_s"]
        self.paths: dict[str, str] = {}
        self.metrics = _Metrics(base_key)

    def __repr__(self) -> str:
        return f"BaseServer({self.base_key}, base={self.model.base_model})"

    async def _load(self, version: str) -> _Held:
        path = self.paths[version]
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.model.load, version, path)
        self.metrics.loads.inc(tags=self.metrics.tags(version))
        log.info("loaded adapter %s from %s", version, path)
        return _Held(self, version)

    async def _adapter(self, version: str) -> None:  # replaced by the multiplexed loader
        raise NotImplementedError

    async def generate(self, request: dict) -> AsyncIterator[dict]:
        from carpool.workers.after_training.fused_inference import BASE, Sampling
        from carpool.workers.serving.served_model import AdapterRefusedError, PromptError
        from carpool.workers.serving.text_stream import TextStream

        started = time.monotonic()
        version = request.get("version")
        shown = version or BASE
        tags = self.metrics.tags(shown)
        self.metrics.requests.inc(tags=tags)
        try:
            prompt = self.model.prompt(request["record"])
            self.model.check_length(prompt, request["max_tokens"])
            if version is not None:
                self.paths[version] = request["path"]
                await self._adapter(version)
        except (PromptError, AdapterRefusedError) as e:
            yield {"error": {"status": 400, "message": str(e)}}
            return
        self.metrics.prompt_tokens.inc(len(prompt), tags=tags)
        seed = request.get("seed")
        sampling = Sampling(
            max_new_tokens=request["max_tokens"],
            temperature=request["temperature"],
            top_p=request["top_p"],
            seed=random.getrandbits(31) if seed is None else seed,
        )
        tokens: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def on_token(token: int | None) -> None:  # on the decoding thread: never raises
            with contextlib.suppress(RuntimeError):  # the request's loop is gone
                loop.call_soon_threadsafe(tokens.put_nowait, token)

        row = self.model.start(shown, prompt, sampling, on_token, key=",".join(map(str, prompt)))
        stream = TextStream(self.model.tokenizer, request.get("stop") or [])
        finished = False
        try:
            yield {"prompt_tokens": len(prompt)}
            ended, hold_until = False, -math.inf  # the first piece goes at once
            while not ended and not stream.stopped:
                arrived = await _next_tokens(tokens, hold_until)
                piece = ""
                for token in arrived:
                    if token is None:
                        ended = True
                        break
                    piece += stream.push(token)
                    if stream.stopped:
                        self.model.cancel(row)
                        break
                if piece:
                    yield {"text": piece}
                if stream.tokens:
                    # Later pieces at most every `stream_interval_s` (unstreamed: none
                    # before the end): each costs the path to the client more than a
                    # token costs the decoder, so tokens arriving meanwhile go together.
                    streamed = request.get("stream", True)
                    hold_until = time.monotonic() + self.stream_interval_s if streamed else math.inf
            finished = True
            reason = "stop" if stream.stopped or row.finish_reason == "stop" else "length"
            yield {
                "text": stream.finish(),
                "finish_reason": reason,
                "completion_tokens": len(stream.tokens),
            }
        finally:
            if not finished:  # the client went away: free the row
                self.model.cancel(row)
            if row.admitted_at is not None:
                self.metrics.queue_time.observe(row.admitted_at - row.submitted_at, tags=tags)
            if row.first_token_at is not None:
                self.metrics.ttft.observe(row.first_token_at - started, tags=tags)
            self.metrics.generated_tokens.inc(len(stream.tokens), tags=tags)
            self.metrics.latency.observe(time.monotonic() - started, tags=tags)

    def loaded(self) -> list[str]:
        return self.model.adapters

    def __del__(self) -> None:
        model = getattr(self, "model", None)
        if model is not None:
            model.close()


async def _next_tokens(tokens: asyncio.Queue, hold_until: float) -> list[int | None]:
    """The next token, then every one that arrives until `hold_until` or the end (None)."""
    arrived = [await tokens.get()]
    while arrived[-1] is not None and (pause := hold_until - time.monotonic()) > 0:
        try:
            arrived.append(await asyncio.wait_for(tokens.get(), pause))
        except TimeoutError:
            break
    while arrived[-1] is not None and not tokens.empty():
        arrived.append(tokens.get_nowait())
    return arrived


def base_server_deployment(max_adapters: int):
    """The deployment class, its multiplexer capped at `max_adapters` (a decorator
    argument, so the class is made per application)."""

    class BaseServer(BaseServerCore):
        @serve.multiplexed(max_num_models_per_replica=max_adapters)
        async def _adapter(self, version: str) -> _Held:
            return await self._load(version)

    return serve.deployment(BaseServer)
