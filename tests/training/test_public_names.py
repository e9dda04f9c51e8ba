"""The public names the README and the package docstrings list resolve to the real classes, lazily, and nothing else is invented."""

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
    assert hasattr(CachedTeacher, "topk") and hasattr(NetworkTeacher, "topk") and TeacherSource is not None
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
