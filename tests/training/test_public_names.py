"""The public names the README and the package docstrings list resolve to the real classes, lazily, and nothing else is invented."""

import pickle
import subprocess
import sys

import pytest
import transformers


def test_training_exports_are_the_defining_classes():
    import training
    from training.trainers.distillation_config import DistillationConfig
    from training.teachers.direct import DirectTeacher
    from training.trainers.distillation_trainer import DistillationTrainer

    assert training.DistillationTrainer is DistillationTrainer and issubclass(DistillationTrainer, transformers.Trainer)
    assert training.DistillationConfig is DistillationConfig
    assert issubclass(DistillationConfig, transformers.TrainingArguments)
    assert training.DirectTeacher is DirectTeacher
    with pytest.raises(AttributeError, match="NoSuchName"):
        training.NoSuchName  # noqa: B018


def test_teacher_sources_import_from_training_teachers():
    from training.teachers import CachedTeacher, NetworkTeacher, TeacherSource
    from training.teachers.cached import CachedTeacher as defined_cached
    from training.teachers.network import NetworkTeacher as defined_network

    assert CachedTeacher is defined_cached and NetworkTeacher is defined_network
    # Each source implements TeacherSource.topk with its parameters in its order (callers pass them by position).
    import inspect

    from training.teachers import DirectTeacher

    protocol = list(inspect.signature(TeacherSource.topk).parameters)
    assert protocol == ["self", "input_ids", "attention_mask", "k", "temperature", "position_ids"]  # packed rows
    for source in (DirectTeacher, CachedTeacher, NetworkTeacher):
        assert list(inspect.signature(source.topk).parameters) == protocol, source.__name__
    import training.teachers as teachers

    assert {"CachedTeacher", "NetworkTeacher"} <= set(dir(teachers)) and set(teachers.__all__) <= set(dir(teachers))
    with pytest.raises(AttributeError, match="NoSuchTeacher"):
        teachers.NoSuchTeacher  # noqa: B018


def test_importing_the_package_does_not_import_the_cache_or_network_code():
    code = ("import sys, training.teachers; "
            "print(sorted(m for m in ('training.teachers.cached', 'training.teachers.network') if m in sys.modules)); "
            "from training.teachers import NetworkTeacher; print('training.teachers.network' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[:2] == ["[]", "True"]


def test_training_exports_every_teacher_source_and_the_callbacks():
    import training
    from training.teachers.cached import CachedTeacher
    from training.teachers.network import NetworkTeacher
    from training.trainers.callbacks import SaddleEscapeCallback, attach_callbacks

    assert training.CachedTeacher is CachedTeacher and training.NetworkTeacher is NetworkTeacher
    assert training.SaddleEscapeCallback is SaddleEscapeCallback and training.attach_callbacks is attach_callbacks
    assert issubclass(training.NonFiniteGuardCallback, transformers.TrainerCallback)
    assert set(training.__all__) <= set(dir(training))


def test_a_moved_module_path_still_works_for_one_release_and_says_where_it_went():
    from training.trainers.distillation_config import DistillationConfig

    import training.config as old

    with pytest.warns(DeprecationWarning, match=r"training\.config\.DistillationConfig moved to "
                                                r"training\.trainers\.distillation_config\.DistillationConfig"):
        assert old.DistillationConfig is DistillationConfig
    with pytest.raises(AttributeError, match="NoSuchName"):
        old.NoSuchName  # noqa: B018
    # a DistillationConfig pickled before the move (Trainer checkpoints keep one in training_args.bin) still loads
    with pytest.warns(DeprecationWarning):
        assert pickle.loads(b"ctraining.config\nDistillationConfig\n.") is DistillationConfig


@pytest.mark.parametrize("old, name, new", [
    ("training.evaluate", "evaluate", "training.evaluation.evaluator"),  # the README's Python API until now
    ("training.train", "run", "training.trainers.distillation"),
    ("training.callbacks", "SaddleEscapeCallback", "training.trainers.callbacks"),
    ("training.wire", "decode_binary", "training.teachers.server.wire"),
    ("training.cache_format", "make_encoding", "training.teachers.cache.format"),
])
def test_names_of_moved_modules_resolve_to_the_same_objects_with_a_warning(old, name, new):
    import importlib

    with pytest.warns(DeprecationWarning, match=new.replace(".", r"\.")):
        value = getattr(importlib.import_module(old), name)
    assert value is getattr(importlib.import_module(new), name)


def test_command_modules_run_the_library_main():
    import importlib

    for command, library in [("train", "trainers.distillation"), ("align", "trainers.alignment"),
                             ("finetune_teacher", "trainers.teacher_sft"), ("preprocess", "data.preprocess"),
                             ("download_datasets", "data.download"), ("synthetic", "data.synthetic"),
                             ("cache_teacher_logits", "teachers.cache.build"), ("serve_teacher", "teachers.server.app"),
                             ("convert_llama2c", "converters.llama2c"), ("evaluate", "evaluation.evaluator"),
                             ("push", "hub.push"), ("model_card", "hub.model_card")]:
        shim = importlib.import_module(f"training.{command}")
        assert shim.main is importlib.import_module(f"training.{library}").main, command


def test_training_data_is_the_data_package_and_keeps_the_old_modules_names():
    import training.data as data
    from training.data.format import tokenizer_fingerprint
    from training.data.shards import PaddingCollator, build_dataset

    assert data.PaddingCollator is PaddingCollator and data.build_dataset is build_dataset
    assert data.tokenizer_fingerprint is tokenizer_fingerprint and data.IGNORE_INDEX == -100
    with pytest.raises(AttributeError, match="NoSuchName"):
        data.NoSuchName  # noqa: B018


def test_python_m_model_cards_names_the_command_that_replaced_it():
    proc = subprocess.run([sys.executable, "-m", "model_cards", "runs/x"], capture_output=True, text=True)
    assert proc.returncode != 0 and "python -m training.model_card" in proc.stderr
