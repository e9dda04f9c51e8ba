"""Distillation of a Transformer teacher into a RetNet student: config, trainer, losses, teacher sources, callbacks.

Layout (one concept a subpackage): `trainers/` (distillation, alignment, teacher SFT, losses, optim, callbacks),
`data/` (records, preprocess, shards, download, synthetic), `teachers/` (direct, cached, network; `cache/`,
`server/`; synthesize: conversations written by the teacher), `converters/` (llama2.c, GGUF), `evaluation/`,
`hub/` (push, model card), `demo/`, `utils/` (incl. `parser`, the one command-line/YAML parser, and `commands`, the
table of commands). The modules left at this level are `cli` (`hf-retnet <command>`, `python -m training
<command>`), `docgen` (the generated command reference), the commands (`python -m training.<command>`) and, for one
release, aliases of moved modules.

The public names load lazily, so `python -m training.preprocess` and its worker processes do not import the
Trainer stack they never use.
"""

from training.utils.exports import lazy

_EXPORTS = {
    "DistillationConfig": ".trainers.distillation_config",
    "load_config": ".trainers.distillation_config",
    "DistillationTrainer": ".trainers.distillation_trainer",
    "distillation_loss": ".trainers.losses",
    "TeacherOutput": ".teachers",
    "TeacherSource": ".teachers",
    "DirectTeacher": ".teachers",
    "CachedTeacher": ".teachers",
    "NetworkTeacher": ".teachers",
    "build_teacher_source": ".teachers",
    "SaddleEscapeCallback": ".trainers.callbacks",
    "SaddleEscapeConfig": ".trainers.callbacks",
    "NonFiniteGuardCallback": ".trainers.callbacks",
    "MemoryCallback": ".trainers.callbacks",
    "ThroughputCallback": ".trainers.callbacks",
    "attach_callbacks": ".trainers.callbacks",
    "default_callbacks": ".trainers.callbacks",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy(__name__, _EXPORTS)
