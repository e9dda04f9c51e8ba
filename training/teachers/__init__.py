"""Teacher-logit sources (direct, cached, network) behind one `TeacherSource` interface, and the factory the
trainer uses to build one from a `DistillationConfig`.

`CachedTeacher` and `NetworkTeacher` are imported on first use (module `__getattr__`), so that
`import training.teachers` does not pull in the cache codecs or the HTTP client.
"""

from __future__ import annotations

from training.utils.exports import lazy

from .base import TeacherOutput, TeacherSource
from .direct import DirectTeacher, load_teacher_model

__all__ = ["CachedTeacher", "DirectTeacher", "NetworkTeacher", "TeacherOutput", "TeacherSource",
           "build_teacher_source", "load_teacher_model"]
__getattr__, __dir__ = lazy(__name__, {"CachedTeacher": ".cached", "NetworkTeacher": ".network"})


def build_teacher_source(config, device=None) -> TeacherSource:
    """The source `config.teacher_source` names, placed on `config.teacher_device` or else `device`.

    direct: `DirectTeacher(teacher_model, teacher_adapter, teacher_dtype)`, full logits when `full_vocab_kd`.
    cached: `CachedTeacher(teacher_cache, verify=teacher_cache_verify)`, checked now against teacher_topk,
    temperature, tokenizer, train_data and eval_data (so a cache that cannot answer the evaluation set fails at
    start, not at the first evaluation).
    network: `NetworkTeacher(teacher_url, api_key=teacher_api_key, protocol=teacher_protocol,
    vocab_size=teacher_vocab_size, model=teacher_model (openai), tokenizer=tokenizer,
    retries=teacher_retries, startup_timeout=teacher_startup_timeout, connect_grace=teacher_connect_timeout)`
    (the key defaults to
    $TEACHER_API_KEY; with openai the server must serve that model and tokenizer).
    """
    kind = config.teacher_source
    if kind == "direct":
        return DirectTeacher(
            config.teacher_model,
            adapter=config.teacher_adapter,
            dtype=config.teacher_dtype,
            device=config.teacher_device or device,
            return_full_logits=bool(config.full_vocab_kd),
        )
    if kind == "cached":
        try:
            from .cached import CachedTeacher
        except ImportError as err:
            raise ValueError(f"teacher_source=cached is not available in this install ({err})") from None
        # The cache checks k, temperature, tokenizer and data against its manifest now, not mid-run.
        data = [spec for spec in (config.train_data, config.eval_data) if spec]
        return CachedTeacher(config.teacher_cache, topk=config.teacher_topk, temperature=config.temperature,
                             tokenizer=config.tokenizer, data=data or None, verify=config.teacher_cache_verify)
    if kind == "network":
        try:
            from .network import NetworkTeacher
        except ImportError as err:
            raise ValueError(f"teacher_source=network is not available in this install ({err})") from None
        return NetworkTeacher(
            config.teacher_url,
            api_key=config.teacher_api_key,
            protocol=config.teacher_protocol,
            vocab_size=config.teacher_vocab_size,
            model=config.teacher_model if config.teacher_protocol == "openai" else None,
            tokenizer=config.tokenizer,
            retries=config.teacher_retries,
            startup_timeout=config.teacher_startup_timeout,
            connect_grace=config.teacher_connect_timeout,
        )
    raise ValueError(f"config key 'teacher_source': {kind!r} is not one of ('direct', 'cached', 'network')")
