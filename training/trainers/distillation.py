"""Distil a teacher into a RetNet student.

    python -m training.train --config examples/configs/train_direct.yaml [--key value ...]
    accelerate launch --config_file examples/accelerate/ddp.yaml -m training.train --config ... [--key value ...]

Resume with `--resume_from_checkpoint <checkpoint folder>` or `--resume_from_checkpoint last` (newest in output_dir).
Everything that can be checked cheaply (config keys and ranges, folders, vocabularies, top-k) is checked before
any weights load or anything is written; the final student and tokenizer land in `output_dir` at the end.
"""

from __future__ import annotations

import logging
import os
import sys

from training.trainers.distillation_config import DistillationConfig, student_config_from_folder
from training.utils.checks import check_local_folder, no_empty_folder_left
from training.utils.errors import command
from training.utils.io import staged_files
from training.utils.plots import plot_loss_curves

logger = logging.getLogger(__name__)


def build_parser():
    """`python -m training.train`'s parser: every DistillationConfig / TrainingArguments field as a YAML key and flag."""
    from training.utils.parser import CommandParser

    return CommandParser(DistillationConfig, prog="python -m training.train", description=__doc__)


def _wants_expandable_segments(config_path: str | None, overrides: list[str]) -> bool:
    """`cuda_expandable_segments` from the YAML / command line, read before anything can touch CUDA."""
    from training.utils.parser import ConfigError

    try:
        values = build_parser().parse_values((["--config", config_path] if config_path else []) + list(overrides))
    except ConfigError:
        return False  # main reports the bad key or value
    return bool(values.get("cuda_expandable_segments", False))


def build_tokenizer(config: DistillationConfig):
    from transformers import AutoTokenizer

    if not config.tokenizer:
        raise ValueError("config key 'tokenizer': required unless teacher_source=direct (then the teacher's is used)")
    from training.converters.gguf import resolve_pretrained

    check_local_folder(config.tokenizer, "config key 'tokenizer'")
    source = resolve_pretrained(config.tokenizer)  # .gguf: its converted folder
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        if os.path.exists(source):
            raise ValueError(f"config key 'tokenizer': no tokenizer could be loaded from {config.tokenizer!r} "
                             f"({reason}); pass a folder with tokenizer.json / tokenizer_config.json") from err
        raise OSError(f"config key 'tokenizer': {config.tokenizer!r} is not a local folder and could not be loaded "
                      f"from the Hub ({reason}); pass an existing tokenizer folder or a reachable Hub id") from err
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # Llama-3 base tokenizers ship without a pad token
    return tokenizer


def _same_tokens(a, b) -> bool:
    """Whether two tokenizers read text into the same ids: same vocabulary (added tokens included) and BOS/EOS."""
    return (a.get_vocab() == b.get_vocab() and a.bos_token_id == b.bos_token_id
            and a.eos_token_id == b.eos_token_id)


def _tokenizer_of(folder_or_id: str):
    """The tokenizer saved with a model, or None when it has none (or it cannot be read without the network)."""
    from transformers import AutoTokenizer

    from training.converters.gguf import resolve_pretrained

    folder_or_id = resolve_pretrained(folder_or_id)  # a .gguf teacher: its converted folder (cached)
    if os.path.isdir(folder_or_id) and not any(
        os.path.isfile(os.path.join(folder_or_id, name)) for name in ("tokenizer.json", "tokenizer_config.json")
    ):
        return None
    try:
        return AutoTokenizer.from_pretrained(folder_or_id)
    except Exception:  # noqa: BLE001 - no tokenizer there (or not reachable): nothing to compare with
        return None


def check_tokenizer(config: DistillationConfig, tokenizer, teacher_vocab: int) -> None:
    """Refuse a training tokenizer that is not the teacher's (nor the student folder's), before any weights load:
    distillation compares distributions id by id, so another tokenizer trains the student on meaningless targets
    and saves a folder whose tokenizer does not match its weights."""
    name = config.tokenizer
    if len(tokenizer) > teacher_vocab:
        raise ValueError(
            f"config key 'tokenizer': {name!r} has {len(tokenizer)} tokens but the teacher's vocabulary has "
            f"{teacher_vocab}; pass the teacher's tokenizer (leave `tokenizer` out to use teacher_model's)"
        )
    compared = False
    for key, other in (("teacher_model", config.teacher_model), ("student", config.student)):
        if not other or other == name or (key == "student" and not os.path.isdir(other)):
            continue
        theirs = _tokenizer_of(other)
        if theirs is None:
            continue
        compared = True
        if not _same_tokens(tokenizer, theirs):
            raise ValueError(
                f"config key 'tokenizer': {name!r} ({len(tokenizer)} tokens, bos {tokenizer.bos_token_id}) is not the "
                f"tokenizer of {key} {other!r} ({len(theirs)} tokens, bos {theirs.bos_token_id}): token ids would not "
                f"match; leave `tokenizer` out (it defaults to teacher_model's) or pass {other!r}"
            )
    if not compared and len(tokenizer) != teacher_vocab:
        logger.warning(f"tokenizer {name!r} has {len(tokenizer)} tokens and the teacher's vocabulary {teacher_vocab}; "
                       "fine for a padded vocabulary, wrong if this is not the teacher's tokenizer")


def teacher_vocab_size(config: DistillationConfig, source=None) -> int:
    """The teacher's vocabulary from its config (direct) or from the source (cached/network): no weights load."""
    if source is not None:
        return int(source.vocab_size)
    from transformers import AutoConfig

    from training.converters.gguf import resolve_pretrained

    return int(AutoConfig.from_pretrained(resolve_pretrained(config.teacher_model)).vocab_size)


def build_student_config(config: DistillationConfig, tokenizer, teacher_vocab: int | None = None):
    """`RetNetConfig.from_variant(student, **student_overrides)` or the folder's config plus the overrides.

    A variant's own vocabulary is Llama-3's; unless `student_overrides` sets `vocab_size`, the student takes the
    teacher's (`teacher_vocab`), as distillation compares distributions id by id. bos/eos/pad ids default to the
    tokenizer's (a folder keeps its own and takes only missing ones). A folder's vocabulary, or an explicit
    override, is kept as it is (a mismatch is then an error). Overrides go through RetNetConfig's constructor, so
    they are checked like any config value.
    """
    from hf_retnet import RetNetConfig

    ids = ("pad_token_id", "bos_token_id", "eos_token_id")
    if os.path.isdir(config.student):
        # The folder's own ids stay (its weights were trained with them); the tokenizer only fills missing ones.
        student_config = student_config_from_folder(config.student, config.student_overrides)
        for key in ids:
            if getattr(student_config, key) is None and key not in (config.student_overrides or {}):
                setattr(student_config, key, getattr(tokenizer, key))
        return student_config
    overrides = dict(config.student_overrides or {})
    for key in ids:
        overrides.setdefault(key, getattr(tokenizer, key))
    if teacher_vocab is not None and "vocab_size" not in overrides:
        overrides["vocab_size"] = int(teacher_vocab)
        logger.info(f"student {config.student!r}: vocab_size {teacher_vocab} taken from the teacher (set "
                    "student_overrides.vocab_size to choose another)")
    return RetNetConfig.from_variant(config.student, **overrides)


def build_student(config: DistillationConfig, student_config):
    """Weights from the folder when it holds a checkpoint, otherwise a fresh init seeded by `config.seed`."""
    from transformers import set_seed

    from hf_retnet import RetNetForCausalLM

    set_seed(config.seed)
    has_weights = os.path.isdir(config.student) and any(
        name.endswith(".safetensors") for name in os.listdir(config.student)
    )
    if has_weights:
        return RetNetForCausalLM.from_pretrained(config.student, config=student_config, use_safetensors=True)
    return RetNetForCausalLM(student_config)


def save_final(trainer, tokenizer, output_dir: str) -> None:
    """Write the student, tokenizer, trainer_state.json and loss_curves.png to a hidden folder next to the results, then move the files in (atomic each)."""
    main_process = trainer.is_world_process_zero()
    with staged_files(output_dir, owner=main_process) as staging:
        trainer.save_model(staging)
        if main_process:
            tokenizer.save_pretrained(staging)
            trainer.state.save_to_json(os.path.join(staging, "trainer_state.json"))  # log_history of the whole run
            plot_loss_curves(trainer.state.log_history, os.path.join(staging, "loss_curves.png"))
    trainer.accelerator.wait_for_everyone()


def build_train_dataset(config: DistillationConfig, tokenizer):
    """The training set, shuffled by epoch; with `train_sampling_strategy: group_by_length` the Trainer's
    LengthGroupedSampler shuffles instead, so the dataset keeps one order and its lengths hold in every epoch."""
    from training.data.shards import build_dataset

    shuffle = config.train_sampling_strategy != "group_by_length"
    return build_dataset(config.train_data, tokenizer, config.max_seq_length, seed=config.seed, shuffle=shuffle)


def run(config: DistillationConfig, callbacks=None):
    """Build everything from `config`, train, save. Returns the trainer (tests read its state).
    `callbacks`: extra `TrainerCallback`s (benchmarks measure their own held-out metrics with them)."""
    with no_empty_folder_left(config.output_dir):  # a run stopped by a mistake leaves no empty output_dir behind
        return _run(config, callbacks)


def _run(config: DistillationConfig, callbacks=None):
    from training.data.shards import PaddingCollator, build_dataset
    from training.hub.push import finish_run, prepare_push
    from training.teachers import build_teacher_source
    from training.trainers.distillation_trainer import DistillationTrainer, check_teacher_student

    push_plan = prepare_push(config)  # --push_to_hub without a token fails here, before anything loads
    tokenizer = build_tokenizer(config)
    source = None if config.teacher_source == "direct" else build_teacher_source(config, device=config.device)
    vocab = teacher_vocab_size(config, source)
    check_tokenizer(config, tokenizer, vocab)
    student_config = build_student_config(config, tokenizer, vocab)
    check_teacher_student(vocab, student_config.vocab_size, config.teacher_topk)
    if not config.train_data:
        raise ValueError("config key 'train_data': required (a shard folder, a JSONL/Parquet/text file or a dataset id)")
    train_dataset = build_train_dataset(config, tokenizer)
    eval_dataset = (
        build_dataset(config.eval_data, tokenizer, config.max_seq_length, seed=config.seed)
        if config.eval_data else None
    )

    student = build_student(config, student_config)
    if source is None:
        source = build_teacher_source(config, device=config.device)
    trainer = DistillationTrainer(
        model=student,
        args=config,
        teacher=source,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=PaddingCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    resume = config.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() in ("true", "last", "latest"):
        resume = True
    trainer.train(resume_from_checkpoint=resume)
    save_final(trainer, tokenizer, config.output_dir)
    finish_run(trainer, config, push_plan)  # training_config.json beside the weights; the Hub upload when asked
    return trainer


@command
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    values = parser.values_or_exit(argv)
    if values.get("cuda_expandable_segments"):
        from training.trainers.callbacks import configure_cuda_allocator

        # Before the config is built: TrainingArguments' bf16 check already initialises CUDA.
        configure_cuda_allocator(expandable_segments=True)
    (config,) = parser.build(values)
    run(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
