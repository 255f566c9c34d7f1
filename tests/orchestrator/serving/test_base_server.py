"""A replica's request stream, without Ray: a client that goes away frees its row."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from carpool.orchestrator.serving.base_server import BaseServerCore
from carpool.workers.serving.served_model import ServedModel


class _Figure:
    def inc(self, *args, **kwargs) -> None:
        pass

    observe = inc


class _NoMetrics:
    def __getattr__(self, name: str) -> _Figure:
        return _Figure()

    def tags(self, adapter: str) -> dict:
        return {"adapter": adapter}


def test_closing_the_stream_mid_decode_cancels_the_row(tiny_base: Path) -> None:
    core = BaseServerCore.__new__(BaseServerCore)  # its parts, without Serve's replica
    core.model = ServedModel(str(tiny_base), device="cpu")
    core.metrics, core.paths, core.stream_interval_s, core.base_key = _NoMetrics(), {}, 0.0, "b"
    decoder = core.model.decoder
    request = {"record": {"prompt": "the quick"}, "version": None, "max_tokens": 50,
               "temperature": 0.0, "top_p": 1.0, "seed": 0, "stop": [], "stream": True}  # fmt: skip

    async def start_then_leave() -> None:
        stream = core.generate(request)
        assert "prompt_tokens" in await anext(stream)
        await stream.aclose()  # what Serve does when the HTTP client disconnects

    try:
        with decoder.between_steps:  # the row is submitted but cannot step yet
            asyncio.run(start_then_leave())
            (row,) = decoder._pending
            assert row.cancelled
        deadline = time.monotonic() + 30
        while decoder.busy:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert row.finish_reason == "cancelled" and len(row.generated) < 50
    finally:
        core.model.close()
