"""The demo's report: held-out scores on identical tokens, stories from the same prompts, plots, report.md and the
terminal summary. People would rather look at a table and two plots than read logs."""

from __future__ import annotations

import os

from training.utils.io import atomic_write_text, save_figure

REPORT_NAME = "report.md"


def _load(path: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import hf_retnet  # noqa: F401  (registers the RetNet with the Auto classes)
    except ImportError:
        pass
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)


def generate_stories(path: str, prompts: list[str], max_new_tokens: int, seed: int) -> list[str]:
    """One sampled continuation per prompt (temperature 0.8, seeded per prompt, so reruns match)."""
    import torch

    model, tok = _load(path)
    stops = [i for i in {tok.eos_token_id, tok.bos_token_id} if i is not None]
    out = []
    for i, prompt in enumerate(prompts):
        torch.manual_seed(seed + i)
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=True, temperature=0.8, top_k=50,
                                 eos_token_id=stops, pad_token_id=tok.pad_token_id)
        out.append(tok.decode(gen[0], skip_special_tokens=True).strip())
    return out


def chat_answers(path: str, requests: list[list[dict]], max_new_tokens: int) -> list[str]:
    """Greedy answers through the model's chat template, one per request (the conversation up to its last user
    turn): what a user of `pipeline("text-generation")` with messages would see."""
    import torch

    model, tok = _load(path)
    stops = [i for i in {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tok.get_vocab()
                         else None} if i is not None]
    out = []
    for messages in requests:
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            gen = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops,
                                 pad_token_id=tok.pad_token_id)
        out.append(tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return out


def heldout_requests(path: str, n: int) -> list[list[dict]]:
    """The first `n` held-out conversations, cut before their last assistant turn."""
    import json

    requests = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            messages = json.loads(line)["messages"]
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            requests.append(messages[:last])
            if len(requests) >= n:
                break
    return requests


def latency_table_md(rows: dict) -> str:
    """Decoding latency and cache memory of the student against the teacher at each context length."""
    student, teacher = rows.get("student") or [], {r["context_length"]: r for r in rows.get("teacher") or []}
    lines = []
    for r in student:
        t = teacher.get(r["context_length"])
        if t is None:
            continue
        lines.append([r["context_length"], f"{r['ms_per_token']:.1f}", f"{t['ms_per_token']:.1f}",
                      f"{t['ms_per_token'] / r['ms_per_token']:.2f}x", f"{r['cache_bytes'] / 2**20:.2f} MiB",
                      f"{t['cache_bytes'] / 2**20:.1f} MiB"])
    return _md_table(["context", "student ms/token", "teacher ms/token", "teacher / student", "student state",
                      "teacher KV cache"], lines)


def plot_loss_vs_tokens(students: dict, scores: dict, path: str) -> str | None:
    """Held-out loss of every student against the tokens it has seen (scored during training on the first held-out
    stories), each one's final held-out loss, and the teacher's as a reference line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    drawn, top = False, 0.0
    for name, r in students.items():
        pts = [(p["tokens"], p["loss"]) for p in r.get("heldout_curve") or []]
        if not pts:
            continue
        top = max(top, pts[min(1, len(pts) - 1)][1])  # from the second point: a random init starts near ln(V)
        line, = ax.plot(*zip(*pts), label=f"{name} (held-out, during training)", alpha=0.8)
        if name in scores:
            ax.scatter([r["tokens"]], [scores[name]["loss"]], color=line.get_color(), marker="o", zorder=3,
                       label=f"{name} final held-out {scores[name]['loss']:.3f}")
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    if "teacher" in scores:
        ax.axhline(scores["teacher"]["loss"], color="black", linestyle="--",
                   label=f"teacher held-out {scores['teacher']['loss']:.3f}")
    ax.set_ylim(top=top + 0.2)
    ax.set_xlabel("tokens seen (stage-1 alignment tokens included)")
    ax.set_ylabel("held-out next-token loss (nats/token)")
    ax.set_title("Students: loss against tokens")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def _fmt_tokens(n) -> str:
    if not n:
        return "-"
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def ce_only_student(ctx: dict) -> str | None:
    """The comparison's baseline: the first random-init student trained on cross-entropy alone (alpha 1)."""
    return next((n for n, r in ctx.get("students", {}).items()
                 if r["init"] == "random" and r["distill_alpha"] == 1.0), None)


def summary_rows(ctx: dict) -> list[list[str]]:
    ev = (ctx.get("evaluate") or {}).get("models", {})
    teacher, ce_only = ev.get("teacher"), ev.get(ce_only_student(ctx) or "")
    rows = []
    for name in ["teacher", *ctx.get("students", {})]:
        s = ev.get(name)
        r = ctx["students"].get(name, {})
        if s is None or "loss" not in s:
            rows.append([name] + ["-"] * (len(HEADER) - 1))
            continue
        passkey = f"{100 * s['passkey']:.0f}%" if s.get("passkey") is not None else "-"
        ratios = [f"{s['perplexity'] / ref['perplexity']:.2f}x" if ref else "-" for ref in (teacher, ce_only)]
        rows.append([name, _fmt_tokens(r.get("tokens")), f"{s['loss']:.3f}", f"{s['perplexity']:.2f}",
                     *ratios, f"{s['kl']:.3f}", f"{100 * s['top1']:.1f}%", passkey])
    return rows


HEADER = ["model", "tokens", "held-out loss", "perplexity", "ppl / teacher", "ppl / CE only", "KL(teacher‖model)",
          "top-1 agree", "passkey"]


def _md_table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(cfg, ctx: dict) -> dict:
    """`<output_dir>/report.md` plus its plots; returns what it wrote."""
    out = cfg.output_dir
    ev = (ctx.get("evaluate") or {}).get("models", {})
    students = ctx.get("students", {})
    files = {}
    plot = plot_loss_vs_tokens(students, ev, os.path.join(out, "loss_vs_tokens.png"))
    if plot:
        files["loss_vs_tokens"] = os.path.basename(plot)
    best = min((n for n in students if n in ev), key=lambda n: ev[n]["loss"], default=None)
    ft = ctx.get("finetune") or {}
    teacher = ft.get("teacher") or ctx["teacher"]["teacher"]
    samples, answers, requests = {}, {}, []
    if best is not None and cfg.chat and cfg.chat_requests:
        requests = heldout_requests(ctx["teacher"]["heldout_data"], cfg.chat_requests)
        answers = {"teacher": chat_answers(teacher, requests, cfg.sample_tokens),
                   best: chat_answers(students[best]["path"], requests, cfg.sample_tokens)}
    elif best is not None and cfg.prompts:
        samples = {"teacher": generate_stories(teacher, cfg.prompts, cfg.sample_tokens, cfg.seed),
                   best: generate_stories(students[best]["path"], cfg.prompts, cfg.sample_tokens, cfg.seed)}

    lines = ["# Distilling a pretrained Llama into RetNet students", ""]
    lines += [f"Teacher: `{cfg.teacher}`" + (" (llama2.c checkpoint, converted with `training.convert_llama2c`)"
                                             if cfg.teacher_is_llama2c else ""),
              (f"Data: conversations the teacher wrote itself (`training.synthesize`, Magpie-style requests, sampled "
               f"answers): {ctx['teacher']['num_train']} to train on " if cfg.chat else
               f"Data: `{cfg.stories}`: {ctx['teacher']['num_train']} training records ")
              + f"({_fmt_tokens(ctx['shards']['num_tokens'])} tokens), {ctx['teacher']['num_heldout']} held out.",
              (f"LoRA teacher correction kept: the teacher's held-out loss went {ft['eval_loss_before']:.4f} -> "
               f"{ft['eval_loss_after']:.4f}; the students learn from, and are compared with, the corrected teacher."
               if ft.get("teacher") else
               f"LoRA teacher correction tried and dropped (held-out loss {ft['eval_loss_before']:.4f} -> "
               f"{ft['eval_loss_after']:.4f})." if "eval_loss_after" in ft else ""),
              f"Teacher top-{cfg.teacher_topk} cached once ({ctx['cache']['bytes_per_token']:.1f} bytes/token); "
              "every student reads the same cache and data order, and gets the same token budget (a "
              "teacher-initialized student's stage-1 tokens count in it).", ""]
    what = "held-out conversations, assistant tokens" if cfg.chat else "held-out stories"
    lines += [f"## Teacher against students ({what})", "", _md_table(HEADER, summary_rows(ctx)), ""]
    n_tok = ev.get("teacher", {}).get("tokens_scored")
    if n_tok and cfg.chat:
        lines.append(f"Scored on {n_tok} held-out tokens, identical for every model: the assistant turns of "
                     f"{ctx['teacher']['num_heldout']} conversations no model trained on (requests and answers the "
                     "teacher sampled), each scored whole.")
    elif n_tok:
        lines.append(f"Scored on {n_tok} held-out tokens, identical for every model: each story BOS-prefixed and "
                     f"scored whole (cut at {cfg.max_seq_length} tokens"
                     + ("" if cfg.append_eos else ", no EOS appended: the teacher never saw one") + ").")
    lines.append("")
    lines.append("| student | init | recipe | distillation alpha | steps | parameters |")
    lines.append("| --- | --- | --- | --- | --- | --- |")
    for n, r in students.items():
        lines.append(f"| {n} | {r['init']} | {r.get('description') or '-'} | {r['distill_alpha']} | {r['steps']} | "
                     f"{r['parameters']:,} |")
    lines.append("")
    if plot:
        lines += ["## Loss against tokens", "", f"![loss against tokens]({files['loss_vs_tokens']})", ""]
    for n, r in students.items():
        err, png = r.get("align_error"), os.path.join(r["path"], "aligned", "align_error.png")
        if not err or not err.get("after"):
            continue
        lines += [f"## Stage 1 of `{n}`: attention transfer", "",
                  f"Each retention layer trained to reproduce its attention layer's output ({_fmt_tokens(r['align_tokens'])}"
                  " tokens, counted in the student's budget). Relative error per layer, at conversion -> after: "
                  + ", ".join(f"L{i} {a:.3f} -> {b:.3f}" for i, (a, b) in enumerate(zip(err["at_conversion"], err["after"])))
                  + ".", ""]
        if os.path.isfile(png):
            lines += [f"![alignment error]({os.path.relpath(png, out)})", ""]
    measured = (ctx.get("evaluate") or {}).get("plots") or {}
    shown = best if best in measured else next(iter(measured), None)
    latency = measured.get(shown, {}).get("latency")
    latency = os.path.relpath(latency, out) if latency else None
    lines += ["## Decoding latency and memory against context", ""]
    if latency:
        files["latency"] = latency
        lines += [f"![latency and memory]({latency})", ""]
        for name, m in measured.items():
            if m.get("latency_rows"):
                lines += [f"`{name}` against the teacher (one sequence, recurrent state vs KV cache):", "",
                          latency_table_md(m["latency_rows"]), ""]
    else:
        lines += ["Measured by `training.evaluate` (student recurrent state against the teacher's KV cache); "
                  "not available in this checkout yet.", ""]
    if answers:
        lines += [f"## Answers to held-out requests: teacher and `{best}`", "",
                  f"Greedy, through the chat template, {cfg.sample_tokens} new tokens at most.", ""]
        for i, messages in enumerate(requests):
            lines += [f"**Request:** {messages[-1]['content']}", ""]
            for who, texts in answers.items():
                lines += [f"- *{who}*: {texts[i]}"]
            lines.append("")
    if samples:
        lines += ["## Stories from the same prompts", "",
                  f"Sampled (temperature 0.8, top-k 50, seeded), {cfg.sample_tokens} new tokens at most.", ""]
        for i, prompt in enumerate(cfg.prompts):
            lines += [f"**Prompt:** {prompt}", ""]
            for who, texts in samples.items():
                lines += [f"- *{who}*: {texts[i]}"]
            lines.append("")
    lines += ["## The student", ""]
    if best is not None:
        path = students[best]["path"]
        card = os.path.join(path, "README.md")
        lines += [f"Best student: `{best}`, in `{os.path.relpath(path, out)}/` (safetensors, config with `auto_map`, "
                  "modeling code, tokenizer), ready for `python -m training.push`:", "",
                  "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
                  f'model = AutoModelForCausalLM.from_pretrained("{path}", trust_remote_code=True)',
                  f'tokenizer = AutoTokenizer.from_pretrained("{path}")', "```", ""]
        with open(card, encoding="utf-8") as handle:
            lines += ["### Model card", "", _embed_card(handle.read(), os.path.relpath(path, out)), ""]
    lines += ["## Stage times", "", "Wall seconds, and CPU seconds of the process (a fairer cost on a shared machine).", "",
              "| stage | wall s | CPU s |", "| --- | --- | --- |"]
    cpu = ctx.get("cpu_seconds", {})
    lines += [f"| {k} | {v:.1f} | {cpu.get(k, 0.0):.1f} |" for k, v in ctx.get("timings", {}).items()]
    lines.append("")
    path = atomic_write_text(os.path.join(out, REPORT_NAME), "\n".join(lines))
    return {"report": os.path.abspath(path), "files": files, "best": best, "samples": samples,
            "answers": {"requests": [m[-1]["content"] for m in requests], **answers}}


def _embed_card(card: str, folder: str) -> str:
    """The card inside report.md: without its YAML header, headings one level down, links relative to the report."""
    import re

    if card.startswith("---"):
        card = card.split("\n---", 1)[1].lstrip("-").lstrip("\n")
    card = re.sub(r"^(#+) ", lambda m: "#" * min(len(m.group(1)) + 2, 6) + " ", card, flags=re.M)
    return re.sub(r"\]\((?!https?://|/|#)([^)]+)\)", lambda m: f"]({folder}/{m.group(1)})", card)


def print_summary(cfg, ctx: dict) -> None:
    rows = summary_rows(ctx) if ctx.get("evaluate") else []
    print()
    print("=" * 78)
    print(f"demo finished in {ctx.get('total_seconds', 0):.0f} s; report: "
          f"{os.path.join(cfg.output_dir, REPORT_NAME)}")
    print("=" * 78)
    if rows:
        widths = [max(len(str(r[i])) for r in [HEADER, *rows]) for i in range(len(HEADER))]
        for row in [HEADER, *rows]:
            print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))
    cpu = ctx.get("cpu_seconds", {})
    for key, seconds in ctx.get("timings", {}).items():
        print(f"  {key:<28} {seconds:8.1f} s wall {cpu.get(key, 0.0):8.1f} s CPU")
