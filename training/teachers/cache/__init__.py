"""The teacher top-k cache: its on-disk format (`format`, docs/cache_format.md) and the builder that fills it from a
direct or network teacher (`build`, `python -m training.cache_teacher_logits`). `training.teachers.CachedTeacher`
reads it."""
