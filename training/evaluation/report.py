"""The report files: `report.json` (everything, machine-readable), `report.md` (tables people read) and the plots,
written into a staging folder that replaces `eval/` in one rename (`training.utils.io.staged_folder`), so a failed
or interrupted evaluation never leaves a half-written report behind (the previous one stays until the new one is
complete)."""

from __future__ import annotations

import json


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e5 else f"{value:.3e}"
    return str(value)


def markdown_table(header: list[str], rows: list[list]) -> list[str]:
    """Lines of a Markdown table; numbers with 4 significant digits, None as a dash."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return lines


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|") or "(empty)"


def render_markdown(report: dict) -> str:
    """The human-readable report, section by section, from the same dict as report.json."""
    student, teacher = report["student"], report.get("teacher")
    lines = ["# Evaluation report", "",
             f"- student: `{student['name_or_path']}` ({student['model_type']}, {student['num_parameters']:,} parameters)"]
    if teacher:
        lines.append(f"- teacher: `{teacher['name_or_path']}` ({teacher['model_type']}, "
                     f"{teacher['num_parameters']:,} parameters)")
    lines += [f"- device: {report['environment']['device']}, dtype: {report['environment']['dtype']}",
              f"- sections run: {', '.join(report['sections'])}", ""]

    held = report.get("heldout")
    if held:
        lines += ["## Held-out loss", "", f"Data: `{held['data']}`. Scoring: {held['scoring']['text']}.", ""]
        rows = [[name, held[name]["tokens"], held[name]["loss"], held[name]["perplexity"]]
                for name in ("student", "teacher") if name in held]
        lines += markdown_table(["model", "tokens", "loss (nats/token)", "perplexity"], rows) + [""]
        if "agreement" in held:
            a = held["agreement"]
            lines += ["Agreement with the teacher on the same tokens "
                      f"(identical inputs: {'yes' if held['identical_tokens'] else 'NO'}):", ""]
            lines += markdown_table(["KL(teacher ‖ student) per token", "top-1 agreement", "tokens"],
                            [[a["kl_teacher_student"], a["top1_agreement"], a["tokens"]]]) + [""]

    passkey = report.get("passkey")
    if passkey:
        lines += ["## Passkey retrieval", "", "A 5-digit key hidden in filler text at a given depth; accuracy of "
                  "greedy completion over the trials of each cell.", ""]
        rows = []
        for name in ("student", "teacher"):
            for c in (passkey.get(name) or {}).get("cells", []):
                rows.append([name, c["context_length"], f"{c['depth']:.0%}", c["trials"], c["accuracy"]])
        lines += markdown_table(["model", "context", "depth", "trials", "accuracy"], rows) + [""]
        if passkey.get("plot"):
            lines += [f"![passkey]({passkey['plot']})", ""]

    gen = report.get("generation")
    if gen:
        lines += ["## Generation samples", "", f"Greedy and sampled (temperature {gen['temperature']}, top-p "
                  f"{gen['top_p']}, seed {gen['seed']}), {gen['max_new_tokens']} new tokens at most.", ""]
        rows = []
        for name in ("student", "teacher"):
            for s in gen.get(name, []):
                rows.append([name, _cell(s["prompt"]), _cell(s["greedy"]), _cell(s["sampled"])])
        lines += markdown_table(["model", "prompt", "greedy", "sampled"], rows) + [""]

    lat = report.get("latency")
    if lat:
        lines += ["## Decoding latency and memory", "", f"Median time per decoded token after prefilling the "
                  f"context ({lat['decode_tokens']} tokens decoded, device {lat['device']}); memory is what the "
                  "model carries between steps (RetNet: recurrent state; Transformer: KV cache).", ""]
        rows = []
        for name in ("student", "teacher"):
            for r in (lat.get(name) or {}).get("rows", []):
                rows.append([name, r["context_length"], r["ms_per_token"], r["cache_bytes"] / 2**20,
                             None if r["peak_bytes"] is None else r["peak_bytes"] / 2**20])
        lines += markdown_table(["model", "context", "ms/token", "state/cache MiB", "peak MiB (CUDA)"], rows) + [""]
        if lat.get("plot"):
            lines += [f"![latency]({lat['plot']})", ""]

    lm = report.get("lm_eval")
    if lm:
        lines += ["## lm-evaluation-harness", ""]
        rows = []
        for task, metrics in lm["tasks"].items():
            for metric, value in metrics.items():
                numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
                if numeric and "," in metric and "stderr" not in metric:  # "acc,none"; not sample_len
                    rows.append([task, metric.split(",")[0], value, lm["n_samples"].get(task, {}).get("effective")])
        lines += markdown_table(["task", "metric", "value", "samples"], rows) + [""]
    return "\n".join(lines)


def write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(obj, handle, indent=2, ensure_ascii=False, allow_nan=True)
        handle.write("\n")
