"""The model-card template of distilled RetNet students (`retnet_student.md`): data only, no code.

`training.hub.model_card` fills it from a run's metadata; `python -m training.model_card RUN_DIR` writes the card.
"""
