"""The endpoint's front door: OpenAI's HTTP API, the key, and routing by `model`.

One ingress replica holds the catalog (bases, adapter versions, aliases). At
start it reads the queue's succeeded jobs and the directories `carpool serve`
named; afterwards the controller tells it of each job that succeeds
(`register_job`), so a new adapter answers by its name at once.
"""

import asyncio
import hashlib
import hmac
import json
import logging
from collections.abc import AsyncIterator

from carpool.orchestrator.control.operator_config import OperatorConfig
from carpool.orchestrator.serving.adapter_catalog import (
    AdapterCatalog,
    AdapterVersion,
    UnknownModelError,
)
from carpool.orchestrator.serving.adapter_sources import (
    FinishedJob,
    job_version,
    succeeded_jobs,
)
from carpool.orchestrator.serving.openai_protocol import (
    ChatRequest,
    CompletionRequest,
    RequestError,
    chunk,
    completion_id,
    parse_request,
    response,
    usage,
    usage_chunk,
)
from carpool.orchestrator.store.job_queue import JobQueue
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

log = logging.getLogger("carpool.serve")
api = FastAPI(title="carpool", docs_url=None, redoc_url=None)


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


# Helpers above: Serve captures the class when it is decorated.


@serve.deployment(max_ongoing_requests=1024)
@serve.ingress(api)
class Ingress:
    def __init__(
        self,
        servers: dict,  # base key -> the BaseServer deployment's handle
        bases: list[dict],  # [{base_model, quantization}]: served whatever the queue holds
        directories: list[dict],  # AdapterVersion fields of `NAME=DIR` adapters
        config: dict,  # the operator config
        key_sha256: str,
    ) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
        self.servers = servers
        self.config = OperatorConfig.model_validate(config)
        self.key_sha256 = key_sha256
        self.catalog = AdapterCatalog()
        self.unserved: dict[str, str] = {}  # a job's name -> why it has no deployment
        for base in bases:
            self.catalog.add_base(base["base_model"], base["quantization"])
        for fields in directories:
            self.catalog.add(AdapterVersion(**fields))
        for job in succeeded_jobs(self.config):
            self._add_job(job)

    def __repr__(self) -> str:
        return f"Ingress(bases={sorted(self.servers)})"

    def _add_job(self, job: FinishedJob) -> None:
        try:
            version = job_version(job, self.catalog, self.config)
        except (FileNotFoundError, ValueError) as e:
            log.warning("job %s: not served: %s", job.id, e)
            return
        if version.base not in self.servers:  # a base `carpool serve` did not deploy
            self.unserved[job.name] = self.unserved[job.id] = (
                f"the base {job.base_model!r} of job {job.id} is not deployed: run "
                "`carpool serve` again to deploy it"
            )
            return
        self.catalog.add(version)
        log.info("serving %s as %s", version.id, version.name)

    # -- told by the controller ------------------------------------------------------------
    async def register_job(self, job_id: str) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._register, job_id)

    def _register(self, job_id: str) -> None:
        with JobQueue(self.config.queue_path()) as queue:
            self._add_job(FinishedJob.of(queue.get(job_id)))

    # -- HTTP ---------------------------------------------------------------------------------
    def _authorize(self, request: Request) -> None:
        given = request.headers.get("authorization", "")
        scheme, _, key = given.partition(" ")
        digest = hashlib.sha256(key.strip().encode()).hexdigest()
        if scheme.lower() != "bearer" or not hmac.compare_digest(digest, self.key_sha256):
            raise RequestError(401, "a valid key is needed: Authorization: Bearer <key>",
                               code="invalid_api_key")  # fmt: skip

    @api.get("/v1/models")
    async def models(self, request: Request):
        try:
            self._authorize(request)
        except RequestError as e:
            return JSONResponse(e.body(), status_code=e.status)
        return {"object": "list", "data": self.catalog.models()}

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._complete(request, chat=False)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._complete(request, chat=True)

    async def _complete(self, request: Request, chat: bool):
        try:
            self._authorize(request)
            try:
                body = json.loads(await request.body())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise RequestError(400, f"the body is not valid JSON: {e}") from None
            parsed = parse_request(body, ChatRequest if chat else CompletionRequest)
            stream = await self._start(parsed, chat)
            first = await anext(stream)
            if "error" in first:
                raise RequestError(first["error"]["status"], first["error"]["message"],
                                   param="model")  # fmt: skip
        except RequestError as e:
            return JSONResponse(e.body(), status_code=e.status)
        rid = completion_id(chat)
        if parsed.stream:
            return StreamingResponse(
                self._events(stream, chat, rid, parsed, first["prompt_tokens"]),
                media_type="text/event-stream",
            )
        text, finish, completion_tokens = [], None, 0
        async for item in stream:
            text.append(item.get("text", ""))
            if "finish_reason" in item:
                finish, completion_tokens = item["finish_reason"], item["completion_tokens"]
        used = usage(first["prompt_tokens"], completion_tokens)
        return response(chat, rid, parsed.model, "".join(text), finish, used)

    async def _start(self, parsed, chat: bool) -> AsyncIterator[dict]:
        """The replica's stream for this request, routed by its model."""
        limit = self.config.serve.max_completion_tokens
        # OpenAI's defaults: 16 tokens for a completion, as many as fit for a chat.
        max_tokens = parsed.requested_tokens(limit if chat else min(16, limit))
        if max_tokens > limit:
            raise RequestError(400, f"max_tokens {max_tokens} is over this server's "
                               f"max_completion_tokens {limit}", param="max_tokens")  # fmt: skip
        try:
            base, version = self.catalog.resolve(parsed.model)
        except UnknownModelError as e:
            why = self.unserved.get(parsed.model)
            raise RequestError(404, why or str(e), param="model", code="model_not_found") from None
        request = {
            "record": parsed.record(),
            "version": None if version is None else version.id,
            "path": None if version is None else version.path,
            "max_tokens": max_tokens,
            "temperature": parsed.temperature,
            "top_p": parsed.top_p,
            "seed": parsed.seed,
            "stop": parsed.stops,
            "stream": parsed.stream,  # unstreamed: the replica sends the text once
        }
        handle = self.servers[base.key].options(
            stream=True, multiplexed_model_id=request["version"] or ""
        )
        return handle.generate.remote(request).__aiter__()

    async def _events(self, stream, chat: bool, rid: str, parsed, prompt_tokens: int):
        """Server-sent events: a chunk per piece of text, the finish, `[DONE]`."""
        model = parsed.model
        if chat:  # the role comes first, as OpenAI sends it
            yield _event(chunk(chat, rid, model, "", None, first=True))
        completion_tokens = 0
        async for item in stream:
            finish = item.get("finish_reason")
            if item.get("text") or finish:
                yield _event(chunk(chat, rid, model, item.get("text", ""), finish))
            if finish:
                completion_tokens = item["completion_tokens"]
        if parsed.include_usage:
            yield _event(usage_chunk(chat, rid, model, usage(prompt_tokens, completion_tokens)))
        yield "data: [DONE]\n\n"
