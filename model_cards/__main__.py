raise SystemExit("`python -m model_cards` moved: run `python -m training.model_card RUN_DIR [--repo_id ...]`")
