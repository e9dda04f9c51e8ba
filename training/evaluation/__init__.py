"""The parts of `python -m training.evaluate`, one concept a file: loading models, held-out scoring, passkey
retrieval, generation samples, decoding latency, lm-evaluation-harness, plots and the report files.

Nothing here is imported by the trainer: evaluation stays out of the training import path.
"""
