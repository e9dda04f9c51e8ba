"""Converters that make teachers from other formats: llama2.c checkpoints (`llama2c`,
`python -m training.convert_llama2c`). Converters that produce or read RetNets live in `hf_retnet/`."""
