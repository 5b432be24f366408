"""`report.md`: the run in words and tables, from `results.json`'s data."""

from __future__ import annotations

from typing import Any

from kdray import metrics as M
from kdray.report.results import CLAIM_SE, SEED_CLAIMS, _standard_error
from kdray.trials import SHAPE_PARAM, TrialConfig, shape_text


def _teacher_rows(teacher: dict[str, Any]) -> str:
    # Runs from before the record kept it, and fine-tuned teachers (epochs 0), say nothing.
    n = teacher.get("train_examples")
    return f", fine-tuned on {n:,} labelled rows" if n and teacher.get("epochs") else ""


def _pm(stat: dict[str, Any], scale: float = 100, digits: int = 1) -> str:
    if stat["std"] is None:
        return f"{scale * stat['mean']:.{digits}f}"
    return f"{scale * stat['mean']:.{digits}f} ± {scale * stat['std']:.{digits}f}"


def _pt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.1f} pt"


def _verdict(c: dict[str, Any]) -> str:
    """Whether a difference of means stands out from the seed-to-seed spread: it is compared
    with the standard error of the difference, sqrt((s1^2 + s2^2) / n)."""
    diff = c["test_accuracy_diff_pt"]
    se = _standard_error(c)
    if se is None:
        return f" -> {'yes' if diff > 0 else 'no'}, from a single seed (no spread to compare with)"
    spread = f" (seed std {c['student_std_pt']:.1f} vs {c['baseline_std_pt']:.1f} pt; standard error of the " \
             f"difference {se:.1f} pt)"
    if diff <= 0:
        return spread + " -> no"
    if se == 0 or diff < CLAIM_SE * se:
        return spread + f" -> not clearly: {diff / se:.1f} standard errors, under {CLAIM_SE:g}" if se > 0 else \
            spread + " -> not clearly: no seed-to-seed spread to judge by"
    return spread + f" -> yes, {diff / se:.1f} standard errors"


def _truncation_sentence(data: dict[str, Any]) -> str:
    if "max_length" not in data:
        return ""
    return (f" Texts are cut to {data['max_length']} tokens, {data['truncation']}: {100 * data['truncated_share']:.0f}% "
            f"of the test texts were longer (median {data['median_tokens']:.0f} tokens).")


def _test_split_sentence(during_search: list[str] | None, by_final: list[str] | None) -> str:
    """What the run recorded about the test split (`TaskData.test_reads`), in words."""
    if during_search is None or by_final is None:
        return "This run did not record who read the test split."
    if during_search:
        return (f"**Warning: the test split was opened during the search (by {', '.join(during_search)}): "
                "selection may have seen it.**")
    return (f"Selection used the validation split only: nothing had opened the test split when the search ended; "
            f"the final stage opened it {len(by_final)} time(s) ({', '.join(by_final)}).")


def render_markdown(results: dict[str, Any], skipped: dict[str, str]) -> str:
    """`report.md`: the headline and claims, the search, the benchmark, the seeds, the errors."""
    sections = (_headline(results), _search(results, skipped), _served(results), _benchmark(results),
                _seeds(results), _errors(results), _files(results))
    return "\n".join(line for section in sections for line in section)


def _headline(results: dict[str, Any]) -> list[str]:
    run, search, teacher = results["run"], results["search"], results["teacher"]
    fin, st = results["final"], results["comparison"]["student_vs_teacher"]
    s_acc = results["variants"]["student"][M.TEST_ACCURACY]
    trainable = TrialConfig.from_yaml(search["best"]).trainable_params
    return [
        f"# kdray report: {run['name']}",
        "",
        f"Data: {run['data']['description']}. Teacher: {run['teacher_model']}{_teacher_rows(teacher)}. "
        f"Student: {run['student_model']}, "
        f"budget {run['budget']:,} trainable parameters.{_truncation_sentence(run['data'])}",
        "",
        f"**The student keeps {100 * s_acc['mean']:.1f}% test accuracy against the teacher's "
        f"{100 * teacher[M.TEST_ACCURACY]:.1f}% ({-st['test_accuracy_drop_pt']:+.1f} pt), with "
        f"{trainable:,} trainable parameters ({100 * trainable / run['budget']:.1f}% of "
        f"the budget), {st['total_params_ratio']:.1f}x fewer parameters in all, {st['size_ratio']:.1f}x smaller on "
        f"disk and {st['latency_speedup_p50']:.2f}x faster at batch 1 on {fin['device']} (PyTorch fp32, both).**",
        "",
        *_served_headline(results.get("serving") or {}),
        f"{_test_split_sentence(search['test_reads'], run['data'].get('test_reads'))} "
        f"Test figures of the retrained models are mean ± std over {fin['seeds']} seed(s).",
        "",
        "| claim | target | measured | holds |",
        "|---|---|---|---|",
        *(f"| {c['claim']} | {c['target']} | {c['measured']} | "
          f"{'-' if c['holds'] is None else ('yes' if c['holds'] else '**no**')} |" for c in results["claims"]),
        "",
    ]


def _served_headline(serving: dict[str, Any]) -> list[str]:
    """The recommended form in one sentence, with its two labelled ratios."""
    h = serving.get("headline")
    if h is None:
        return []
    same = h["speedup_vs_teacher_same_runtime"]
    runtime = h["form"].split("/", 1)[1]
    same_text = f" and {same:.2f}x as fast as the teacher in the same runtime ({runtime})" if same else ""
    return [f"**Served as `{h['form']}` (recommended: {serving['why']}): {h['latency_ms_p50']:.2f} ms at batch 1 "
            f"with tokenization, {h['speedup_vs_teacher_pytorch']:.2f}x as fast as the teacher served in PyTorch "
            f"fp32{same_text}; {100 * h['test_accuracy']:.1f}% test accuracy "
            f"({-h['accuracy_drop_pt_vs_fp32_student']:+.1f} pt against the fp32 student), {h['size_mb']:.1f} MB "
            f"({h['size_ratio_vs_fp32_student']:.2f} of the fp32 student's file).**", ""]


def _served(results: dict[str, Any]) -> list[str]:
    """Every form of the student and the teacher where it runs: the table, the flags, the skips."""
    serving = results.get("serving") or {}
    if not serving.get("forms"):
        return []
    forms = serving["forms"]
    measured = [b for b in forms.values() if "skipped" not in b]
    threads = measured[0]["threads"] if measured else "n/a"
    lines = ["## Served", "",
             f"Each form where it runs on {serving['device']} ({threads} threads for PyTorch and ONNX Runtime alike): "
             f"batch-1 latency over {measured[0]['latency_runs'] if measured else 0} real test sentences with "
             f"tokenization in every call, interleaved; throughput over the whole test split at batch "
             f"{measured[0]['throughput_batch_size'] if measured else 0}; test accuracy from that pass. Recommended: "
             f"`{serving['recommended']}` ({serving['why']}).", "",
             "| form | p50 ms | p95 ms | examples/s | size MB | peak mem MB | test acc % | vs fp32 student |",
             "|---|---|---|---|---|---|---|---|"]
    reference = forms["student/pytorch"][M.TEST_ACCURACY]
    for name, b in forms.items():
        if "skipped" in b:
            lines.append(f"| {name} | skipped: {b['skipped']} | | | {b['size_mb']:.1f} | | | |")
            continue
        flag = " **flagged: over serve.max_accuracy_drop**" if name in serving["flagged"] else ""
        drop = f"{100 * (b[M.TEST_ACCURACY] - reference):+.1f} pt" if b["model"] == "student" else ""
        lines.append(f"| {name} | {b['latency_ms_p50']:.2f} | {b['latency_ms_p95']:.2f} | {b['throughput_per_s']:.0f} | "
                     f"{b['size_mb']:.1f} | {b['peak_memory_mb']:.0f} | {100 * b[M.TEST_ACCURACY]:.1f} | {drop}{flag} |")
    checks = [f"`{rt}` {c['check']['max_abs_logit_diff']:.1e} (same class on {100 * c['check']['same_class']:.1f}%)"
              for rt, c in serving.get("exported", {}).items() if c.get("check")]
    errors = [f"`{rt}`: {c['error']}" for rt, c in serving.get("exported", {}).items() if c.get("error")]
    if checks:
        lines += ["", f"Largest difference of each ONNX form's validation logits from PyTorch's: {', '.join(checks)}."]
    if errors:
        lines += ["", f"Not made: {'; '.join(errors)}. The PyTorch student is served instead."]
    return lines + [""]


def _search(results: dict[str, Any], skipped: dict[str, str]) -> list[str]:
    search = results["search"]
    best = search["best"]
    c = TrialConfig.from_yaml(best)
    lines = [
        "## Search",
        "",
        f"{search['trials']} trials trained ({search['completed']} completed, {search['stopped_early']} stopped early "
        f"by ASHA, {search['failed']} failed)"
        + (f"; {search['rejected_over_budget']} sampled configurations were infeasible (over the parameter budget, or "
           f"a too-slow shape) and rejected before training" if search["rejected_over_budget"] is not None else "")
        + (f"; {search['seconds']:.0f} s" if search["seconds"] is not None else "") + ".",
        "",
        f"Best (validation accuracy {best['best_val_accuracy']:.4f}): alpha {c.alpha:.3f}, T {c.temperature:.2f}, "
        f"learning rate {c.learning_rate:.2e}, {c.epochs} epoch(s), LoRA ({c.lora.variant}) r {c.lora.r}, lora_alpha "
        f"{c.lora.lora_alpha:g}, lora_dropout {c.lora.lora_dropout:.2f}, modules {','.join(c.lora.target_modules)}, "
        f"layers {c.layers_text}"
        + (f"; student shape: layers {shape_text(c.keep_layers)} of the model" if c.keep_layers is not None else "")
        + ".",
        "",
    ]
    timed = "latency" in results["plots"]
    runtime = next((r.get("latency_runtime") for r in search["trials_table"] if r.get("latency_runtime")), None)
    shape_cols = (f"| shape | ms (batch 1, {runtime or 'pytorch'}) ", "|---|---") if timed else ("", "")
    lines += [f"| trial | alpha | T | lr | LoRA | r | modules | layers {shape_cols[0]}| trainable params | best val acc "
              f"| epochs | status |", f"|---|---|---|---|---|---|---|---{shape_cols[1]}|---|---|---|---|"]
    for r in sorted(search["trials_table"], key=lambda r: -(r["best_val_accuracy"] or 0)):
        acc = "n/a" if r["best_val_accuracy"] is None else f"{r['best_val_accuracy']:.4f}"
        mark = " **(chosen)**" if r["trial_id"] == best["trial_id"] else ""
        shape = f"| {r.get(SHAPE_PARAM) or 'as configured'} | {r[M.LATENCY_MS]:.2f} " if timed else ""
        lines.append(f"| {r['trial_id']}{mark} | {r['alpha']:.2f} | {r['temperature']:.2f} | {r['learning_rate']:.1e} "
                     f"| {r.get('lora_variant', 'lora')} | {r['lora_r']} | {r['target_modules']} | {r['layers']} {shape}| {r[M.TRAINABLE_PARAMS]:,} | {acc} "
                     f"| {r['epochs_run']} | {r['status']} |")
    lines += ["", "![Pareto front](plots/pareto.png)", ""]
    if timed:
        lines += ["![Accuracy vs latency](plots/latency.png)", ""]
    lines += ["![Validation curves](plots/curves.png)", ""]
    if "importances" in skipped:
        lines += [f"Parameter importances: not computed ({skipped['importances']}).", ""]
    else:
        lines += ["![Parameter importances](plots/importances.png)", ""]
    return lines


def _benchmark(results: dict[str, Any]) -> list[str]:
    run, teacher, fin = results["run"], results["teacher"], results["final"]
    variants, bench, cmp_ = results["variants"], results["benchmark"], results["comparison"]
    lines = [
        "## Teacher vs student vs baselines",
        "",
        f"Test split: {run['data']['sizes']['test']:,} examples. Latency: batch 1, p50/p95 over "
        f"{bench['student']['latency_runs']} runs after warm-up; throughput: the whole test split at batch "
        f"{bench['student']['throughput_batch_size']}; memory: {bench['student']['memory_kind'].replace('_', ' ')}; "
        f"device: {fin['device']}.",
        "",
        "| model | trainable params | total params | size MB | test acc % | macro-F1 % | precision % | recall % "
        "| p50 ms | p95 ms | examples/s | peak mem MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, b in bench.items():
        if name == "teacher":
            trainable = b["total_params"]  # fully fine-tuned
            acc, f1, pr, rc = (f"{100 * teacher[k]:.1f}" for k in (M.TEST_ACCURACY, M.TEST_F1, M.TEST_PRECISION,
                                                                     M.TEST_RECALL))
        else:
            v = variants["student" if name.startswith("student") else name]
            trainable = v[M.TRAINABLE_PARAMS]
            acc, f1, pr, rc = (_pm(v[k]) for k in (M.TEST_ACCURACY, M.TEST_F1, M.TEST_PRECISION, M.TEST_RECALL))
        lines.append(f"| {name} | {trainable:,} | {b['total_params']:,} | {b['size_mb']:.1f} | {acc} | {f1} | {pr} | "
                     f"{rc} | {b['latency_ms_p50']:.2f} | {b['latency_ms_p95']:.2f} | {b['throughput_per_s']:.0f} | "
                     f"{b['peak_memory_mb']:.0f} |")
    lines += [
        "",
        "The merged and unmerged student are the same weights: their test accuracy is the chosen seed's "
        "row of the student (the table shows the student's mean over seeds for both).",
        f"Merged vs unmerged logits on the test split differ by at most {cmp_['merge_max_abs_logit_diff']:.1e}.",
    ]
    if "merged_vs_plain_latency_ratio" in cmp_:
        lines.append(f"Merged student latency / plain model of the same architecture (head-only baseline): "
                     f"{cmp_['merged_vs_plain_latency_ratio']:.3f} (LoRA costs nothing once merged); unmerged / merged: "
                     f"{bench['student_unmerged']['latency_ms_p50'] / bench['student']['latency_ms_p50']:.3f}.")
    lines += ["", "![Latency and size](plots/latency_size.png)", "", "### Did distillation and LoRA earn their keep?", ""]
    for key, what, _, claim in SEED_CLAIMS:
        if key not in cmp_:
            continue
        c = cmp_[key]
        lines.append(f"- {what}: {_pt(c['test_accuracy_diff_pt'])} test accuracy, mean over {c['seeds']} seed(s)"
                     f"{_verdict(c)} ({claim}).")
    return lines


def _seeds(results: dict[str, Any]) -> list[str]:
    run, fin, variants = results["run"], results["final"], results["variants"]
    reused = (f" The student's seed {run['seed']} run is the search's trial {fin['reused_search_trial']} itself "
              "(same configuration and seed: a retrain would repeat it)." if fin.get("reused_search_trial") else "")
    lines = ["", f"Per seed (validation accuracy decides which seed ships).{reused}", "",
              "| model | seed | val acc | test acc | test macro-F1 |", "|---|---|---|---|---|"]
    for name, v in variants.items():
        for r in v["runs"]:
            mark = " (shipped)" if name == "student" and r["seed"] == v["chosen_seed"] else ""
            lines.append(f"| {name}{mark} | {r['seed']} | {r[M.VAL_ACCURACY]:.4f} | {r[M.TEST_ACCURACY]:.4f} | "
                         f"{r[M.TEST_F1]:.4f} |")
    return lines


def _errors(results: dict[str, Any]) -> list[str]:
    ea = results["error_analysis"]
    lines = [
        "", "## Error analysis", "",
        f"The shipped student misclassifies {ea['errors']} of {ea['test_examples']} test examples "
        f"({100 * ea['error_rate']:.1f}%; the teacher {ea['teacher_errors']}). Buckets (a class pair's rate is among "
        f"the examples of its true class):", "",
        "| bucket | examples | student errors | student error rate | teacher error rate |", "|---|---|---|---|---|",
    ]
    for b in ea["buckets"]:
        rate = "n/a" if b["error_rate"] is None else f"{100 * b['error_rate']:.1f}%"
        trate = "n/a" if b["teacher_error_rate"] is None else f"{100 * b['teacher_error_rate']:.1f}%"
        lines.append(f"| {b['bucket']} | {b['examples']} | {b['errors']} | {rate} | {trate} |")
    lines += ["", "Most confident mistakes per bucket:", ""]
    for b in ea["buckets"]:
        if not b["shown"]:
            continue
        lines.append(f"**{b['bucket']}**")
        lines.append("")
        for e in b["shown"]:
            text = e["text"].replace("|", "\\|").replace("\n", " ")
            lines.append(f"- \"{text}\" — true {e['label']}, predicted {e['predicted']} ({e['probability']:.2f})")
        lines.append("")
    return lines + ["![Confusion matrices](plots/confusion.png)", ""]


def _files(results: dict[str, Any]) -> list[str]:
    run, fin = results["run"], results["final"]
    served = [f for f in ("student-onnx", "student-onnx-int8") if f"student/{f[8:]}" in (results.get("serving") or {})
              .get("forms", {})]
    return ["## Files", "",
            *(f"- `final/{f}/`: the student as ONNX ({'int8 weights' if f.endswith('int8') else 'fp32'}) with its "
              f"tokenizer; `kdray predict --model final/{f} \"some text\"` runs it with onnxruntime, without torch."
              for f in served),
            f"- `final/student/`: the merged student with its tokenizer; "
              f"`transformers.pipeline(\"text-classification\", model=\"{fin['student_dir']}\")` loads it from the run "
              f"directory, `kdray predict --model {fin['student_dir']} \"some text\"` prints a label.",
              "- `final/adapter/`: the chosen seed's unmerged PEFT adapter (LoRA + head).",
              "- `results.json`: every number here (schema: `kdray/report/results.schema.json`); `search/trials.parquet`: "
              "every trial; `final/predictions.parquet`: test predictions of student and teacher.",
              f"- Versions: {', '.join(f'{k} {v}' for k, v in run['versions'].items())}.", ""]
