"""Publishing a finished run: the model card (`model_card`, filling the `model_cards` template) and the Hub upload
(`push`, `python -m training.push`). Nothing here is on the trainer's import path."""
