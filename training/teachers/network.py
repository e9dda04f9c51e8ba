"""NetworkTeacher: the teacher's top-k over HTTP, from `python -m training.serve_teacher` (`/v1/topk`)
or, as a fallback, from any stock vLLM OpenAI-compatible server (`/v1/completions` + `prompt_logprobs`).

Before the first request the client waits (bounded by `startup_timeout`) for a server that is still
starting, but gives up after `connect_grace` seconds (default 10) while nothing listens at the URL (connection
refused: a wrong URL or a server never started should fail at once, not after minutes), and with the openai protocol
checks that the server serves the asked-for model and the run's
tokenizer (docs/vllm.md). Rows are sent without their padding and the answer is re-padded here; the documents of a
packed row (`position_ids`) are sent as rows of their own, so the server reads each alone. Every
answer is checked against the request (row lengths, k, an input checksum, id range, finite sorted
log-probs) and retried with exponential backoff when the server is down, overloaded or sends a broken
answer; after the retry budget a `TeacherUnavailableError` says so. A failed or partial answer is never
returned.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time

import httpx
import numpy as np
import torch

from training.teachers.server.wire import (
    BINARY_MEDIA_TYPE,
    JSON_MEDIA_TYPE,
    TopKAnswer,
    WireFormatError,
    decode_binary,
    decode_json,
    input_checksum,
    topk_from_logprob_dicts,
)

from .base import TeacherOutput, TeacherSource, padding_answer
from .prefetch import Prefetcher

logger = logging.getLogger(__name__)
API_KEY_ENV = "TEACHER_API_KEY"
TOKEN_ID_PREFIX = "token_id:"  # vLLM's key format under return_tokens_as_token_ids


class TeacherRequestError(ValueError):
    """The server refused the request itself (4xx): retrying cannot help; the message says what to change."""


class TeacherAuthError(TeacherRequestError):
    """401/403: the API key is missing or wrong."""


class TeacherMismatchError(TeacherRequestError):
    """The server serves another model or tokenizer than the one this run distils from."""


class TeacherAnswerError(ValueError):
    """The server answered, but the answer does not match the request (shapes, ids, values)."""


class TeacherUnavailableError(RuntimeError):
    """No valid answer within the retry budget (server down, timing out, or answering garbage)."""


class TeacherNotListeningError(TeacherUnavailableError, ConnectionRefusedError):
    """Nothing listens at the teacher URL at start-up (connection refused past `connect_grace`): a wrong URL or a
    server not started, an input mistake, so it is also an OSError, which the commands answer with one line."""


class NetworkTeacher(TeacherSource):
    """A `TeacherSource` backed by a teacher server.

    Args:
        url: server root, e.g. "http://10.0.0.5:8080" (a trailing "/v1" is accepted).
        api_key: sent as "Authorization: Bearer ..."; defaults to $TEACHER_API_KEY.
        timeout: seconds for one request to complete (read/write/pool); connect has its own `connect_timeout`.
        retries: extra attempts after the first on connection errors, timeouts, 5xx/429 and broken answers.
        backoff: first wait between attempts; doubles each time up to `max_backoff`.
        binary: ask `/v1/topk` for the packed binary answer (default) instead of JSON.
        protocol: "topk" (our server) or "openai" (stock vLLM `/v1/completions`, temperature 1 only).
        model: model id for the "openai" protocol (default: the first one `/v1/models` lists); a server
            that does not list it is refused before any batch is sent.
        vocab_size: the teacher's vocabulary; asked from `/v1/models` when None (stock vLLM does not say,
            so pass it for the "openai" protocol).
        tokenizer: the tokenizer the student trains with (folder, Hub id or tokenizer object). With the
            "openai" protocol a probe text is tokenized here and by the server's `/tokenize`; different ids
            mean the server serves another tokenizer (another teacher), which is refused at once.
        startup_timeout: seconds to wait, before the first request, for a server that is still starting
            (vLLM takes one to several minutes) or not up yet; a warning says what it waits for every ~10 s.
        connect_grace: within that wait, seconds a refused connection (nothing listening at the URL) is retried
            before `TeacherUnavailableError` says so; raise it for a server started together with the run that
            listens only once its model has loaded (config key `teacher_connect_timeout`).
    """

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        timeout: float = 300.0,
        retries: int = 5,
        backoff: float = 0.5,
        binary: bool = True,
        protocol: str = "topk",
        *,
        max_backoff: float = 30.0,
        connect_timeout: float = 10.0,
        model: str | None = None,
        vocab_size: int | None = None,
        tokenizer=None,
        startup_timeout: float = 600.0,
        connect_grace: float = 10.0,
    ):
        if protocol not in ("topk", "openai"):
            raise ValueError(f"protocol={protocol!r} must be 'topk' (our /v1/topk) or 'openai' (vLLM /v1/completions)")
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"teacher_url={url!r} must start with http:// or https:// (e.g. http://127.0.0.1:8080)")
        if retries < 0 or backoff < 0 or timeout <= 0 or startup_timeout < 0 or connect_grace < 0:
            raise ValueError(
                f"need retries >= 0, backoff >= 0, timeout > 0, startup_timeout >= 0, connect_grace >= 0; got "
                f"{retries}, {backoff}, {timeout}, {startup_timeout}, {connect_grace}"
            )
        url = url.rstrip("/")
        self.url = url[: -len("/v1")] if url.endswith("/v1") else url
        self.protocol = protocol
        self.binary = binary
        self.retries, self.backoff, self.max_backoff = retries, backoff, max_backoff
        self.model = model
        self._vocab_size = vocab_size
        self.tokenizer = tokenizer
        self.startup_timeout = startup_timeout
        self.connect_grace = connect_grace
        self._ready = False  # set once the server answered and (openai) its model and tokenizer checked out
        self._models: list[dict] | None = None
        api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(
            base_url=self.url,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=connect_timeout),
            limits=httpx.Limits(max_connections=8, max_keepalive_connections=4),
        )
        self._prefetcher = Prefetcher(workers=2, max_pending=4, name="teacher-prefetch")
        self._ready_lock = threading.Lock()
        self.last_timing: dict[str, float] = {}  # seconds (and bytes) of the latest /v1/topk answer

    # ---------------------------------------------------------------- TeacherSource

    @property
    def vocab_size(self) -> int:
        if self._vocab_size is None:
            self._ensure_ready()
            entry = self._first_model()
            if "vocab_size" not in entry:
                raise ValueError(
                    f"the server at {self.url} does not report vocab_size (a stock vLLM server does not); "
                    "pass vocab_size=<the teacher's vocabulary size> to NetworkTeacher"
                )
            self._vocab_size = int(entry["vocab_size"])
        return self._vocab_size

    def topk(self, input_ids, attention_mask=None, k: int = 512, temperature: float = 1.0,
             position_ids=None) -> TeacherOutput:
        """input_ids/attention_mask [B, T] -> TeacherOutput [B, T, k] on input_ids' device. position_ids [B, T]
        (packed rows): each document is sent as a row of its own."""
        start = time.perf_counter()
        out = self._prefetcher.take(self._key(input_ids, attention_mask, k, temperature, position_ids))
        if out is None:
            out = self._fetch(input_ids, attention_mask, k, temperature, position_ids)
        out.seconds = time.perf_counter() - start  # time the trainer actually waited
        return TeacherOutput(out.token_ids.to(input_ids.device), out.logprobs.to(input_ids.device), None, out.seconds)

    def prefetch(self, input_ids, attention_mask=None, k: int = 512, temperature: float = 1.0,
                 position_ids=None) -> None:
        """Start fetching this batch's answer in the background; a later `topk` with the same inputs takes it."""
        key = self._key(input_ids, attention_mask, k, temperature, position_ids)
        ids = input_ids.detach().to("cpu", copy=True)
        mask = attention_mask.detach().to("cpu", copy=True) if attention_mask is not None else None
        positions = position_ids.detach().to("cpu", copy=True) if position_ids is not None else None
        self._prefetcher.submit(key, self._fetch, ids, mask, k, temperature, positions)

    def close(self) -> None:
        """Stop the prefetch threads (pending prefetches are dropped) and close the HTTP connections."""
        self._prefetcher.close()
        self._client.close()

    def __enter__(self) -> "NetworkTeacher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------- request / answer

    @staticmethod
    def _key(input_ids, attention_mask, k, temperature, position_ids=None) -> str:
        digest = hashlib.blake2b(digest_size=16)
        digest.update(np.ascontiguousarray(input_ids.detach().cpu().numpy()).tobytes())
        digest.update(str(tuple(input_ids.shape)).encode())
        if attention_mask is not None:
            digest.update(np.ascontiguousarray(attention_mask.detach().cpu().numpy()).tobytes())
        if position_ids is not None:
            digest.update(b"positions")
            digest.update(np.ascontiguousarray(position_ids.detach().cpu().long().numpy()).tobytes())
        digest.update(f"{k}:{temperature!r}".encode())
        return digest.hexdigest()

    def _fetch(self, input_ids, attention_mask, k: int, temperature: float, position_ids=None) -> TeacherOutput:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq_len], got shape {tuple(input_ids.shape)}")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} != input_ids {tuple(input_ids.shape)}")
        if not 0 < k <= self.vocab_size:
            raise ValueError(f"teacher_topk={k} must be in [1, vocab_size={self.vocab_size}]")
        if not temperature > 0:
            raise ValueError(f"temperature={temperature} must be > 0")
        ids = input_ids.detach().cpu()
        mask = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.detach().cpu().bool()
        batch, seq_len = ids.shape
        rows = [ids[b][mask[b]].tolist() for b in range(batch)]  # each row without its padding
        sent = [b for b in range(batch) if rows[b]]
        if not sent:  # all padding: nothing to ask
            return padding_answer(mask, k)
        requests = [rows[b] for b in sent]
        if position_ids is not None:  # packed rows: one request row per document, in order
            from training.data.shards import document_starts

            if position_ids.shape != input_ids.shape:
                raise ValueError(f"position_ids {tuple(position_ids.shape)} != input_ids {tuple(input_ids.shape)}")
            starts = document_starts(position_ids.detach().cpu(), mask)  # [B, T]
            requests = []
            for b in sent:
                bounds = [0, *starts[b][mask[b]].nonzero().squeeze(1).tolist(), len(rows[b])]
                requests += [rows[b][i:j] for i, j in zip(bounds[:-1], bounds[1:])]
        # The answer's rows, concatenated, are the sent rows' real tokens in order either way.
        answer = self._request_with_retries(requests, k, temperature)
        flat_ids = torch.from_numpy(answer.token_ids.astype(np.int64))  # [N, k], a writable copy
        flat_lps = torch.from_numpy(np.array(answer.logprobs, dtype=np.float32))  # [N, k], a writable copy
        if len(sent) == batch and bool(mask.all()):  # nothing padded: the answer is the batch
            return TeacherOutput(flat_ids.view(batch, seq_len, k), flat_lps.view(batch, seq_len, k)).validate(
                batch, seq_len, k)
        out = padding_answer(mask, k)  # padding positions hold the stand-in; the real ones are filled here
        token_ids, logprobs = out.token_ids, out.logprobs  # [B, T, k] each
        offset = 0
        for b in sent:
            where = mask[b].nonzero().squeeze(1)  # positions of row b's real tokens
            n = len(where)
            first, last = int(where[0]), int(where[-1])
            target = slice(first, last + 1) if last - first + 1 == n else where  # contiguous: a plain slice copy
            token_ids[b, target] = flat_ids[offset : offset + n]
            logprobs[b, target] = flat_lps[offset : offset + n]
            offset += n
        return TeacherOutput(token_ids, logprobs).validate(batch, seq_len, k)

    def _request_with_retries(self, rows: list[list[int]], k: int, temperature: float) -> TopKAnswer:
        if self.protocol == "openai" and temperature != 1.0:
            raise ValueError(
                f"temperature={temperature}: a stock vLLM server returns raw (temperature 1) prompt log-probs and "
                "top-k alone cannot be re-tempered exactly; use temperature 1.0 or our /v1/topk server"
            )
        self._ensure_ready()
        started, last_error = time.monotonic(), None
        for attempt in range(self.retries + 1):
            if attempt:
                wait = min(self.max_backoff, self.backoff * 2 ** (attempt - 1))
                logger.warning("teacher request failed (%s); retry %d/%d in %.2fs", last_error, attempt, self.retries, wait)
                time.sleep(wait)
            try:
                if self.protocol == "topk":
                    return self._topk_once(rows, k, temperature)
                return self._openai_once(rows, k)
            except (httpx.TransportError, _RetryableStatus, TeacherAnswerError) as err:
                last_error = err
        raise TeacherUnavailableError(
            f"no valid answer from the teacher server at {self.url} after {self.retries + 1} attempts over "
            f"{time.monotonic() - started:.1f}s; last error: {last_error!r}. Check that `python -m "
            "training.serve_teacher` is running and reachable, or raise retries/backoff to wait longer."
        ) from last_error

    def _post(self, path: str, payload: dict, accept: str, limit: int) -> tuple[httpx.Headers, bytes | bytearray]:
        """POST and read the whole body (at most `limit` bytes) or raise the error its status calls for."""
        with self._client.stream("POST", path, json=payload, headers={"Accept": accept}) as response:
            status = response.status_code
            if status == 200:
                return response.headers, _read_body(response, limit)
            response.read()
            detail = _detail(response)
        if status in (401, 403):
            raise TeacherAuthError(
                f"the teacher server at {self.url} refused the API key ({status}: {detail}); set teacher_api_key "
                f"(or ${API_KEY_ENV}) to the key the server was started with"
            )
        if status in (408, 425, 429) or status >= 500:
            raise _RetryableStatus(f"{status} from {path}: {detail}")
        raise TeacherRequestError(f"the teacher server at {self.url} rejected the request ({status}): {detail}")

    def _topk_once(self, rows: list[list[int]], k: int, temperature: float) -> TopKAnswer:
        accept = BINARY_MEDIA_TYPE if self.binary else JSON_MEDIA_TYPE
        tokens = sum(len(r) for r in rows)
        # No honest answer is larger than this (JSON: ~25 bytes per float, ~7 per id, plus brackets).
        limit = 64 + 4 * len(rows) + tokens * k * (12 if self.binary else 48) + 4096
        started = time.perf_counter()
        headers, body = self._post("/v1/topk", {"input_ids": rows, "k": k, "temperature": temperature}, accept, limit)
        received = time.perf_counter()
        try:
            is_binary = headers.get("content-type", "").startswith(BINARY_MEDIA_TYPE)
            answer = decode_binary(body) if is_binary else decode_json(body)
        except WireFormatError as err:
            raise TeacherAnswerError(f"undecodable answer: {err}") from None
        self.last_timing = {**_server_timing(headers), "request": received - started,
                            "decode": time.perf_counter() - received, "bytes": len(body)}
        if answer.input_crc32 != input_checksum(rows):
            raise TeacherAnswerError("the answer's input checksum does not match the request: answer to other tokens")
        if abs(answer.temperature - temperature) > 1e-6 * max(1.0, temperature):
            raise TeacherAnswerError(f"answer applied temperature {answer.temperature}, asked for {temperature}")
        return self._check(answer, rows, k)

    def _openai_once(self, rows: list[list[int]], k: int) -> TopKAnswer:
        """vLLM /v1/completions with token-id prompts and one generated token.

        vLLM's `prompt_logprobs[t]` (t >= 1) scores token t given tokens < t, and entry 0 is None; our
        position t is "the next token after reading 0..t", so position t = prompt_logprobs[t + 1] for
        t < T-1, and the last position is the distribution of the one generated token (`logprobs=k`,
        `top_logprobs[0]`, keyed "token_id:<id>" under `return_tokens_as_token_ids`). Entries may hold
        k+1 items (the scored token rides along); we keep the k largest.
        """
        payload = {
            "model": self.model or self._first_model()["id"],
            "prompt": rows,
            "max_tokens": 1,
            "temperature": 1.0,
            "prompt_logprobs": k,
            "logprobs": k,
            "return_tokens_as_token_ids": True,
            "echo": False,
            "stream": False,
        }
        # vLLM's per-entry objects are verbose (~100 bytes per top-k entry).
        limit = 4096 + sum(len(r) + 1 for r in rows) * (k + 1) * 256
        try:
            _, body = self._post("/v1/completions", payload, JSON_MEDIA_TYPE, limit)
        except TeacherRequestError as err:
            if "logprobs" in str(err) and "max" in str(err):
                raise TeacherRequestError(
                    f"teacher_topk={k} is above the vLLM server's max_logprobs (20 unless it was started with "
                    f"--max-logprobs): restart vLLM with `--max-logprobs {k}` (or larger), or lower teacher_topk. "
                    f"The server said: {err}"
                ) from None
            raise
        try:
            data = json.loads(body)
        except ValueError as err:
            raise TeacherAnswerError(f"/v1/completions answered non-JSON: {err}") from None
        return self._check(parse_vllm_completion(data, rows, k), rows, k)

    def _check(self, answer: TopKAnswer, rows: list[list[int]], k: int) -> TopKAnswer:
        """Reject any answer that is not exactly the one asked for."""
        want = [len(r) for r in rows]
        if answer.lengths.tolist() != want:
            raise TeacherAnswerError(f"answer rows have lengths {answer.lengths.tolist()}, request had {want}")
        if answer.token_ids.shape != (sum(want), k) or answer.logprobs.shape != (sum(want), k):
            raise TeacherAnswerError(
                f"answer arrays are {answer.token_ids.shape}/{answer.logprobs.shape}, expected {(sum(want), k)}"
            )
        if answer.token_ids.size:
            lo, hi = int(answer.token_ids.min()), int(answer.token_ids.max())
            if lo < 0 or hi >= self.vocab_size:
                raise TeacherAnswerError(f"answer holds token ids in [{lo}, {hi}], outside [0, {self.vocab_size})")
            lps = answer.logprobs
            if not np.isfinite(lps).all() or lps.max() > 1e-4:
                raise TeacherAnswerError("answer holds non-finite or positive log-probabilities")
            if (np.diff(lps, axis=1) > 1e-6).any():
                raise TeacherAnswerError("answer log-probabilities are not sorted in descending order")
        return answer

    # ---------------------------------------------------------------- start-up and identity checks

    def _ensure_ready(self) -> None:
        """Once per client: wait (bounded) for a server that is still starting, then, for the openai
        protocol, check it serves the asked-for model and the run's tokenizer."""
        if self._ready:
            return
        with self._ready_lock:
            if self._ready:
                return
            if self.startup_timeout > 0:
                self._wait_until_up()
            if self.protocol == "openai":
                served = [m.get("id") for m in self._list_models()]
                if self.model is not None and self.model not in served:
                    raise TeacherMismatchError(
                        f"the server at {self.url} serves {served}, not model={self.model!r}: point teacher_url at "
                        f"the server of {self.model!r}, or start vLLM with `--served-model-name {self.model}` if "
                        "it is the same weights under another name"
                    )
                if self.tokenizer is not None:
                    self._check_tokenizer(self.model or served[0])
            self._ready = True

    def _wait_until_up(self) -> None:
        """Poll `/v1/models` until the server answers with anything but 502/503/504 or the connection error
        of a server not listening yet; give up after `startup_timeout` seconds."""
        started = time.monotonic()
        deadline, next_note, last = started + self.startup_timeout, started + 10.0, None
        while True:
            try:
                response = self._client.get("/v1/models", timeout=httpx.Timeout(10.0, connect=5.0))
                if response.status_code not in (502, 503, 504):
                    return
                last = f"{response.status_code}: {_detail(response)}"
            except httpx.ConnectError as err:  # nothing listens there (or the host is unknown)
                last = repr(err)
                if time.monotonic() - started >= self.connect_grace:
                    raise TeacherNotListeningError(
                        f"no teacher server at {self.url}: connection refused for {self.connect_grace:g}s ({err}). "
                        "Start it (`python -m training.serve_teacher --model <teacher> --port <port>`, or vLLM's "
                        "OpenAI server) or fix teacher_url; for a server still loading, raise teacher_connect_timeout."
                    ) from None
            except httpx.TransportError as err:
                last = repr(err)
            now = time.monotonic()
            if now >= deadline:
                raise TeacherUnavailableError(
                    f"the teacher server at {self.url} did not come up within startup_timeout="
                    f"{self.startup_timeout:.0f}s (last: {last}). Start it (`python -m training.serve_teacher "
                    "...` or vLLM's OpenAI server), check teacher_url, or allow it longer to start."
                )
            if now >= next_note:
                logger.warning("waiting for the teacher server at %s to start (%.0fs of at most %.0fs; last: %s)",
                               self.url, now - started, self.startup_timeout, last)
                next_note += 10.0
            time.sleep(min(1.0, deadline - now))

    PROBE_TEXT = "The teacher's tokenizer check: 0123456789, Zürich, naïve café 東京 -> ok!"

    def _check_tokenizer(self, model: str) -> None:
        """Tokenize a probe text here and with the server's `/tokenize` (vLLM has it); different ids mean
        another tokenizer. A server without `/tokenize` is trusted, with a warning."""
        tokenizer = self.tokenizer
        if isinstance(tokenizer, str):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        local = tokenizer(self.PROBE_TEXT, add_special_tokens=False)["input_ids"]
        try:
            response = self._client.post("/tokenize", json={"model": model, "prompt": self.PROBE_TEXT,
                                                            "add_special_tokens": False})
        except httpx.TransportError as err:
            raise TeacherUnavailableError(f"the teacher server at {self.url} did not answer /tokenize: {err!r}") from err
        if response.status_code in (404, 405):
            logger.warning("the server at %s has no /tokenize: cannot check that it uses the run's tokenizer", self.url)
            return
        if response.status_code != 200:
            raise TeacherRequestError(f"/tokenize at {self.url} answered {response.status_code}: {_detail(response)}")
        remote = response.json().get("tokens")
        if remote != local:
            raise TeacherMismatchError(
                f"the server at {self.url} (model {model!r}) tokenizes with another tokenizer than this run's: "
                f"{self.PROBE_TEXT!r} -> {str(remote)[:120]} there, {str(local)[:120]} here. Serve the teacher "
                "whose tokenizer the data was preprocessed with, or set `tokenizer` to the server's."
            )

    def _list_models(self) -> list[dict]:
        if self._models is None:
            self._first_model()
        return self._models

    def _first_model(self) -> dict:
        last_error = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(self.max_backoff, self.backoff * 2 ** (attempt - 1)))
            try:
                response = self._client.get("/v1/models")
            except httpx.TransportError as err:
                last_error = err
                continue
            if response.status_code in (401, 403):
                raise TeacherAuthError(
                    f"the teacher server at {self.url} refused the API key ({response.status_code}: "
                    f"{_detail(response)}); set teacher_api_key (or ${API_KEY_ENV}) to the server's key"
                )
            if response.status_code != 200:
                last_error = _RetryableStatus(f"{response.status_code} from /v1/models: {_detail(response)}")
                continue
            data = response.json().get("data") or []
            if not data:
                raise TeacherRequestError(f"the server at {self.url} lists no models at /v1/models")
            self._models = data
            if self.model is not None:
                return next((m for m in data if m.get("id") == self.model), data[0])
            return data[0]
        raise TeacherUnavailableError(
            f"the teacher server at {self.url} did not answer /v1/models after {self.retries + 1} attempts; "
            f"last error: {last_error!r}. Is it running and reachable?"
        ) from last_error


def parse_vllm_completion(data: dict, rows: list[list[int]], k: int) -> TopKAnswer:
    """A vLLM `/v1/completions` body (token-id prompts, max_tokens=1, prompt_logprobs=k, logprobs=k,
    return_tokens_as_token_ids) -> TopKAnswer in the next-token convention (see `_openai_once`)."""
    try:
        choices = sorted(data["choices"], key=lambda c: c["index"])
        if len(choices) != len(rows):
            raise TeacherAnswerError(f"{len(choices)} choices for {len(rows)} prompts")
        ids, lps = [], []
        for b, (choice, row) in enumerate(zip(choices, rows)):
            prompt = choice["prompt_logprobs"]
            if prompt is None or len(prompt) != len(row):
                got = None if prompt is None else len(prompt)
                raise TeacherAnswerError(f"prompt {b}: {got} prompt_logprobs entries for {len(row)} tokens")
            positions = [{int(tid): float(e["logprob"]) for tid, e in entry.items()} for entry in prompt[1:]]
            generated = choice["logprobs"]["top_logprobs"][0]
            if any(not key.startswith(TOKEN_ID_PREFIX) for key in generated):
                raise TeacherAnswerError("top_logprobs are keyed by text, not 'token_id:<id>' (vLLM too old?)")
            positions.append({int(key[len(TOKEN_ID_PREFIX):]): float(lp) for key, lp in generated.items()})
            row_ids, row_lps = topk_from_logprob_dicts(positions, k)
            ids.append(row_ids)
            lps.append(row_lps)
    except TeacherAnswerError:
        raise
    except (KeyError, TypeError, IndexError, AttributeError, ValueError) as err:
        raise TeacherAnswerError(f"not a vLLM prompt_logprobs completion: {err!r}") from None
    return TopKAnswer(np.asarray([len(r) for r in rows], np.int64), np.concatenate(ids), np.concatenate(lps))


def _read_body(response: httpx.Response, limit: int) -> bytes | bytearray:
    """The whole body, refusing more than `limit` bytes; with a Content-Length the chunks land straight in
    one preallocated buffer (no list of chunks joined at the end: that copy is most of a large read)."""
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and "content-encoding" not in response.headers:
        size = int(declared)
        if size > limit:
            raise TeacherAnswerError(f"answer of {size} bytes is larger than any valid answer ({limit} bytes)")
        buffer, offset = bytearray(size), 0
        view = memoryview(buffer)
        for chunk in response.iter_raw():
            if offset + len(chunk) > size:
                raise TeacherAnswerError(f"answer is longer than its Content-Length {size}")
            view[offset : offset + len(chunk)] = chunk
            offset += len(chunk)
        if offset != size:
            raise TeacherAnswerError(f"answer ended after {offset} of {size} bytes")
        return buffer
    chunks, total = [], 0
    for chunk in response.iter_bytes():
        total += len(chunk)
        if total > limit:
            raise TeacherAnswerError(f"answer is larger than any valid answer ({limit} bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


def _server_timing(headers: httpx.Headers) -> dict[str, float]:
    """`Server-Timing: forward;dur=12.5, ...` (milliseconds) -> {"server_forward": 0.0125, ...} (seconds)."""
    out = {}
    for part in headers.get("server-timing", "").split(","):
        name, _, duration = part.strip().partition(";dur=")
        try:
            out[f"server_{name}"] = float(duration) / 1000
        except ValueError:
            continue
    return out


class _RetryableStatus(Exception):
    """A status worth retrying (5xx, 429, 408)."""


def _detail(response: httpx.Response) -> str:
    """The error text of a response: FastAPI's `detail`, vLLM's `error.message` (or older `message`), else the body."""
    try:
        data = response.json()
    except ValueError:
        return response.text[:500]
    detail = response.text
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and "message" in error:
            detail = error["message"]
        elif "detail" in data:
            detail = data["detail"]
        elif "message" in data:
            detail = data["message"]
    return str(detail)[:500]
