"""Converters that make Llama teachers from other formats: llama2.c checkpoints (`llama2c`,
`python -m training.convert_llama2c`) and GGUF files (`gguf`, `python -m training.convert_gguf`; every teacher loader
takes a `.gguf` path through `gguf.resolve_pretrained`). Converters that produce or read RetNets live in `hf_retnet/`."""
