"""A teacher server: `POST /v1/topk` answers the teacher's top-k next-token log-probabilities over HTTP,
so a large teacher can live on its own GPUs while students train elsewhere (`NetworkTeacher` is the client).

    python -m training.serve_teacher --model meta-llama/Llama-3.2-1B-Instruct [--api-key KEY]

Wire format: docs/topk_wire_format.md. Concurrent requests are grouped by a dynamic batcher into one
forward; request size is bounded (413), an API key is enforced when set (401), and it binds 127.0.0.1
unless told otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError

from training.teachers.server.wire import (
    BINARY_MEDIA_TYPE,
    JSON_MEDIA_TYPE,
    TopKAnswer,
    encode_binary,
    encode_json,
    input_checksum,
    smallest_id_dtype,
)
from training.utils.errors import command

logger = logging.getLogger("training.serve_teacher")
API_KEY_ENV = "TEACHER_API_KEY"


class TopKRequest(BaseModel):
    """Body of `POST /v1/topk`: unpadded rows of token ids (rows may differ in length)."""

    model_config = ConfigDict(extra="forbid")
    input_ids: list[list[StrictInt]] = Field(min_length=1)
    k: StrictInt = Field(ge=1)
    temperature: float = Field(default=1.0, gt=0.0)


@dataclass
class _Job:
    rows: list[list[int]]
    k: int
    temperature: float
    future: asyncio.Future
    tokens: int = field(init=False)

    def __post_init__(self):
        self.tokens = sum(len(r) for r in self.rows)


@dataclass
class BatchResult:
    token_ids: np.ndarray  # [N, k]
    logprobs: np.ndarray  # [N, k] float32
    forward_s: float
    batch_requests: int


class DynamicBatcher:
    """Collects requests for `window_s` after the first one arrives, then runs the group as one forward
    (up to `max_batch_tokens` padded tokens; a larger single request runs alone) and splits the answer.
    Forwards run one at a time on a worker thread so the event loop keeps accepting requests."""

    def __init__(self, engine, max_batch_tokens: int = 8192, window_s: float = 0.005):
        self.engine = engine
        self.max_batch_tokens = max_batch_tokens
        self.window_s = window_s
        self._queue: asyncio.Queue[_Job] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="teacher-forward")
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=False, cancel_futures=True)

    @property
    def queued(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    async def submit(self, rows: list[list[int]], k: int, temperature: float) -> BatchResult:
        job = _Job(rows, k, temperature, asyncio.get_running_loop().create_future())
        await self._queue.put(job)
        return await job.future

    @staticmethod
    def _padded_tokens(jobs: list[_Job]) -> int:
        rows = [r for j in jobs for r in j.rows]
        return len(rows) * max(len(r) for r in rows)

    async def _run(self) -> None:
        carry: _Job | None = None
        while True:
            group = [carry if carry is not None else await self._queue.get()]
            carry = None
            await asyncio.sleep(self.window_s)  # let concurrent requests join this forward
            while not self._queue.empty():
                job = self._queue.get_nowait()
                if self._padded_tokens(group + [job]) > self.max_batch_tokens:
                    carry = job
                    break
                group.append(job)
            try:
                await self._run_group(group)
            except Exception as err:  # never let one bad group stop the server
                logger.exception("teacher forward failed")
                for job in group:
                    if not job.future.done():
                        job.future.set_exception(err)

    async def _run_group(self, group: list[_Job]) -> None:
        loop = asyncio.get_running_loop()
        by_temperature: dict[float, list[_Job]] = defaultdict(list)
        for job in group:
            by_temperature[job.temperature].append(job)
        for temperature, jobs in by_temperature.items():
            live = [j for j in jobs if not j.future.done()]  # skip clients that went away
            if not live:
                continue
            rows = [r for j in live for r in j.rows]
            k = max(j.k for j in live)
            start = time.perf_counter()
            try:
                ids, logprobs = await loop.run_in_executor(self._executor, self.engine.topk_rows, rows, k, temperature)
            except Exception as err:
                for job in live:
                    if not job.future.done():
                        job.future.set_exception(err)
                continue
            forward_s = time.perf_counter() - start
            offset = 0
            for job in live:
                part = slice(offset, offset + job.tokens)
                if not job.future.done():
                    job.future.set_result(BatchResult(ids[part, : job.k], logprobs[part, : job.k], forward_s, len(live)))
                offset += job.tokens


def _wants_binary(request: Request) -> bool:
    return BINARY_MEDIA_TYPE in request.headers.get("accept", "")


def create_app(
    engine,
    *,
    model_name: str,
    api_key: str | None = None,
    max_tokens_per_request: int = 65536,
    max_k: int = 1024,
    max_batch_tokens: int = 8192,
    batch_window_s: float = 0.005,
) -> FastAPI:
    """Build the FastAPI app around an engine (anything with `vocab_size` and `topk_rows(rows, k, temperature)`)."""
    batcher = DynamicBatcher(engine, max_batch_tokens=max_batch_tokens, window_s=batch_window_s)
    # A generous bound on the JSON request body: ~8 bytes per token id plus brackets, and headroom.
    max_body_bytes = 32 * max_tokens_per_request + 65536
    id_dtype = smallest_id_dtype(engine.vocab_size)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="hf-retnet teacher server", lifespan=lifespan)
    app.state.batcher = batcher

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        sent = request.headers.get("authorization", "")
        if not hmac.compare_digest(sent.encode(), f"Bearer {api_key}".encode()):
            raise HTTPException(
                401,
                detail="missing or wrong API key: send 'Authorization: Bearer <key>' with the key the server "
                "was started with (--api-key or $" + API_KEY_ENV + ")",
                headers={"WWW-Authenticate": "Bearer"},
            )

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
            raise HTTPException(413, detail=f"request body of {declared} bytes exceeds {max_body_bytes} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body_bytes:
                raise HTTPException(413, detail=f"request body exceeds {max_body_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "engine": engine.name, "queued": batcher.queued}

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return {
            "object": "list",
            "data": [{
                "id": model_name,
                "object": "model",
                "owned_by": "hf-retnet",
                "engine": engine.name,
                "vocab_size": engine.vocab_size,
                "max_k": max_k,
                "max_tokens_per_request": max_tokens_per_request,
            }],
        }

    @app.post("/v1/topk")
    async def topk(request: Request):
        check_key(request)
        received = time.perf_counter()
        body = await read_body(request)
        try:
            req = TopKRequest.model_validate_json(body)
        except ValidationError as err:
            return JSONResponse(status_code=422, content={"detail": json.loads(err.json(include_url=False))})
        if req.k > max_k:
            raise HTTPException(413, detail=f"k={req.k} exceeds this server's --max-k {max_k}")
        if req.k > engine.vocab_size:
            raise HTTPException(422, detail=f"k={req.k} exceeds the teacher's vocab_size {engine.vocab_size}")
        tokens = sum(len(r) for r in req.input_ids)
        if tokens > max_tokens_per_request:
            raise HTTPException(
                413,
                detail=f"{tokens} tokens exceed this server's --max-tokens-per-request {max_tokens_per_request}; "
                "send smaller batches or restart the server with a larger bound",
            )
        for b, row in enumerate(req.input_ids):
            if not row:
                raise HTTPException(422, detail=f"input_ids row {b} is empty; send rows without padding, none empty")
            lo, hi = min(row), max(row)
            if lo < 0 or hi >= engine.vocab_size:
                raise HTTPException(422, detail=f"input_ids row {b} holds ids outside [0, {engine.vocab_size})")
        longest = max(len(r) for r in req.input_ids)
        max_len = getattr(engine, "max_model_len", None)  # the vllm engine's; the hf engine has no fixed bound
        if max_len is not None and longest > max_len:
            raise HTTPException(413, detail=f"a row of {longest} tokens exceeds this server's --max-model-len {max_len}")
        check = getattr(engine, "check_request", None)  # engine-specific limits (vLLM: temperature 1 only)
        if check is not None:
            try:
                check(req.k, req.temperature)
            except ValueError as err:
                raise HTTPException(422, detail=str(err)) from None
        parsed = time.perf_counter()
        try:
            result = await batcher.submit(req.input_ids, req.k, req.temperature)
        except Exception as err:  # the forward failed (e.g. out of memory): 500, which clients may retry
            raise HTTPException(500, detail=f"teacher forward failed: {type(err).__name__}: {err}") from None
        answered = time.perf_counter()
        answer = TopKAnswer(
            lengths=np.asarray([len(r) for r in req.input_ids], dtype=np.int64),
            token_ids=result.token_ids,
            logprobs=result.logprobs,
            temperature=req.temperature,
            input_crc32=input_checksum(req.input_ids),
        )
        binary = _wants_binary(request)
        loop = asyncio.get_running_loop()
        if binary:
            content = await loop.run_in_executor(None, encode_binary, answer, id_dtype)
        else:
            content = await loop.run_in_executor(None, encode_json, answer)
        encoded = time.perf_counter()
        ms = lambda s: f"{1000 * s:.3f}"  # noqa: E731
        timing = (
            f"parse;dur={ms(parsed - received)}, queue;dur={ms(answered - parsed - result.forward_s)}, "
            f"forward;dur={ms(result.forward_s)}, encode;dur={ms(encoded - answered)}, "
            f"total;dur={ms(encoded - received)}"
        )
        return Response(
            content=content,
            media_type=BINARY_MEDIA_TYPE if binary else JSON_MEDIA_TYPE,
            headers={"Server-Timing": timing, "X-Batch-Requests": str(result.batch_requests)},
        )

    return app


def build_engine(args) -> object:
    """The engine named by --engine, loaded from --model (+ --adapter); a .gguf file is converted once (cached)."""
    from training.converters.gguf import resolve_pretrained

    model = resolve_pretrained(args.model)
    if args.engine == "vllm":
        from training.teachers.server.vllm_engine import VLLMEngine

        return VLLMEngine(
            model, adapter=args.adapter, max_k=args.max_k, dtype=args.dtype,
            tensor_parallel_size=args.tensor_parallel_size, max_model_len=args.max_model_len,
            enforce_eager=args.enforce_eager,
        )
    import torch

    from training.teachers.direct import DirectTeacher
    from training.teachers.server.hf_engine import HFEngine

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return HFEngine(DirectTeacher(model, adapter=args.adapter, dtype=args.dtype, device=device))


@dataclass
class ServeArguments:
    """`python -m training.serve_teacher` (hf-retnet serve): every field is a flag (`_` or `-`) and a YAML key."""

    model: str = field(metadata={"help": "teacher folder, Hub id (safetensors weights) or Llama .gguf file (converted "
                                         "once: training.convert_gguf)"})
    adapter: str | None = field(default=None, metadata={"help": "optional peft adapter folder, merged into the teacher"})
    host: str = field(default="127.0.0.1", metadata={"help": "bind address (default 127.0.0.1: this machine only)"})
    port: int = field(default=8080, metadata={"help": "TCP port"})
    api_key: str | None = field(default=None, metadata={
        "help": f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV}, else no key)"})
    engine: str = field(default="hf", metadata={
        "choices": ["hf", "vllm"], "help": "hf: transformers model (CPU or GPU); vllm: vLLM engine "
        "(pip install 'hf-retnet[vllm]'; CPU build: docs/vllm.md)"})
    dtype: str = field(default="auto", metadata={"help": "auto, float32, bfloat16 or float16"})
    device: str | None = field(default=None, metadata={"help": "hf engine device (default: cuda when available, else cpu)"})
    tensor_parallel_size: int = field(default=1, metadata={"help": "vllm engine: GPUs per teacher"})
    max_model_len: int | None = field(default=None, metadata={
        "help": "vllm engine: longest row it accepts (default: the model's; lower it to shrink the KV cache, e.g. on CPU)"})
    enforce_eager: bool = field(default=False, metadata={
        "help": "vllm engine: skip graph compilation (starts much faster; forwards may be slower)"})
    max_tokens_per_request: int = field(default=65536, metadata={"help": "larger requests get 413"})
    max_k: int = field(default=1024, metadata={"help": "larger k gets 413"})
    max_batch_tokens: int = field(default=8192, metadata={"help": "padded tokens the batcher groups into one forward"})
    batch_window_ms: float = field(default=5.0, metadata={
        "help": "how long the batcher waits for concurrent requests to join a forward (milliseconds)"})
    model_name: str | None = field(default=None, metadata={"help": "id reported by /v1/models (default: the --model value)"})
    log_level: str = field(default="info", metadata={"choices": ["critical", "error", "warning", "info", "debug"],
                                                     "help": "uvicorn and server log level"})
    access_log: bool = field(default=False, metadata={"help": "log every request (off: it costs throughput)"})


def build_parser():
    from training.utils.parser import CommandParser

    return CommandParser(
        ServeArguments, prog="python -m training.serve_teacher",
        description="Serve a teacher's top-k next-token log-probabilities over HTTP (POST /v1/topk, "
        "GET /health, GET /v1/models). Wire format: docs/topk_wire_format.md.",
    )


def parse_args(argv=None) -> ServeArguments:
    parser = build_parser()
    (args,) = parser.parse_or_exit(argv)
    if args.api_key is None:
        args.api_key = os.environ.get(API_KEY_ENV)
    for name in ("port", "max_tokens_per_request", "max_k", "max_batch_tokens"):
        if getattr(args, name) <= 0:
            parser.exit(2, f"{parser.prog}: error: --{name.replace('_', '-')} must be positive, got {getattr(args, name)}\n")
    return args


@command
def main(argv=None) -> None:
    import uvicorn

    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        logger.warning("serving on %s without an API key: anyone who can reach this port can use the teacher", args.host)
    try:
        engine = build_engine(args)
    except (ImportError, FileNotFoundError, ValueError) as err:
        raise SystemExit(f"serve_teacher: error: {err}") from None
    app = create_app(
        engine,
        model_name=args.model_name or args.model,
        api_key=args.api_key,
        max_tokens_per_request=args.max_tokens_per_request,
        max_k=args.max_k,
        max_batch_tokens=args.max_batch_tokens,
        batch_window_s=args.batch_window_ms / 1000,
    )
    logger.info("teacher %s (engine %s, vocab %d) on http://%s:%d", args.model, engine.name, engine.vocab_size,
                args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=args.access_log)


if __name__ == "__main__":
    main()
