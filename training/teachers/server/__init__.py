"""The teacher server (`python -m training.serve_teacher`): the FastAPI app and its dynamic batcher (`app`), the
`/v1/topk` wire format shared with `training.teachers.NetworkTeacher` (`wire`, docs/topk_wire_format.md) and the
engines that run the teacher (`hf_engine`: transformers; `vllm_engine`: vLLM, optional)."""
