"""The report folder of `python -m training.eval --report DIR`, one folder per case:

    DIR/<case_id>/prompt-only/eval.json       every figure and every answer of the last prompt-only run
    DIR/<case_id>/fine-tuned/eval.json        the same for the fine-tuned suspect
    DIR/<case_id>/<variant>/detective.json    the scripted detective's transcript and evidence
    DIR/<case_id>/report.md                   the figures side by side, against the targets
    DIR/<case_id>/report.png                  a bar chart of the same
    DIR/README.md                             one table over every case in DIR

report.md and report.png are rebuilt from whichever JSON files are there after each run, so running the two
variants one after the other leaves them side by side.
"""

from __future__ import annotations

import json
from pathlib import Path

from training.scoring import FINE_TUNED, METRICS, PROMPT_ONLY, TARGETS

VARIANTS = (PROMPT_ONLY, FINE_TUNED)


def write(directory: Path, result: dict, detective: bool = False) -> Path:
    folder = Path(directory) / result["case"]
    run = folder / result["variant"]
    run.mkdir(parents=True, exist_ok=True)
    (run / ("detective.json" if detective else "eval.json")).write_text(json.dumps(result, indent=2) + "\n")
    runs = {v: _read(folder / v / "eval.json") for v in VARIANTS}
    detectives = {v: _read(folder / v / "detective.json") for v in VARIANTS}
    (folder / "report.md").write_text(markdown(result["case"], runs, detectives))
    if any(runs.values()):
        chart(result["case"], runs, folder / "report.png")
    (Path(directory) / "README.md").write_text(overview(Path(directory)))
    return folder


def overview(directory: Path) -> str:
    """Every case's figures in one table: fine-tuned / prompt-only, with the detective's verdict."""
    short = {"fact_accuracy": "facts", "in_character_rate": "in character", "leak_rate": "leak",
             "false_confession_rate": "false conf.", "tell_rate": "tell", "retest_consistency": "retest",
             "offscript_responsive_rate": "off script", "repeat_rate": "repeats"}
    lines = ["# Evaluation of the bundled cases", "",
             "Each cell: fine-tuned / prompt-only (n/a: the figure does not apply to the case; -: not run). "
             "Targets: " + ", ".join(f"{short[m]} {op} {t:g}" for m, (op, t) in TARGETS.items())
             + ". Definitions: docs/eval.md; per-case answers and charts in each folder.", "",
             "| case | verdict | " + " | ".join(short[m] for m in METRICS) + " | detective |",
             "|---|---|" + "---|" * (len(METRICS) + 1)]
    for folder in sorted(p for p in directory.iterdir() if p.is_dir()):
        runs = {v: _read(folder / v / "eval.json") for v in VARIANTS}
        dets = {v: _read(folder / v / "detective.json") for v in VARIANTS}
        if not any(runs.values()) and not any(dets.values()):
            continue
        known = next(r for r in [*runs.values(), *dets.values()] if r)
        cells = []
        for m in METRICS:
            ft, po = (("-" if runs[v] is None else _fmt(runs[v].get(m))) for v in (FINE_TUNED, PROMPT_ONLY))
            met = _met(runs[FINE_TUNED], m) if runs[FINE_TUNED] else None
            cells.append(f"{ft}{'' if met is None else (' ✓' if met else ' ✗')} / {po}")
        det = " / ".join("-" if dets[v] is None else ("pass" if dets[v]["passed"] else "FAIL")
                         for v in (FINE_TUNED, PROMPT_ONLY))
        lines.append(f"| [{folder.name}]({folder.name}/report.md) | {'guilty' if known['guilty'] else 'innocent'} | "
                     + " | ".join(cells) + f" | {det} |")
    return "\n".join(lines) + "\n"


def what_missed(answer: dict) -> str | None:
    """Why an answer of an eval.json counts against the suspect, or None when it does not."""
    reasons = [*answer["breaks"], *(f"confesses '{x}'" for x in answer["admitted"]),
               *(f"contradicts '{x}'" for x in answer["contradicted"])]
    if answer["kind"] == "fact" and not all(answer["stated"]):
        reasons.append("misses an expected fact")
    if answer.get("responsive") is False:
        source = f"topic '{answer['topic']}'" if answer["topic"] else "no topic (its own words)"
        reasons.append(f"a '{answer['intent']}' question answered from {source}")
    if answer.get("repeated"):
        reasons.append("repeats an earlier answer of the interrogation")
    return "; ".join(reasons) or None


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _met(run: dict, metric: str) -> bool | None:
    """Whether a run met a target; None where it does not apply or the run predates the figure."""
    return run["targets"].get(metric, {}).get("met")


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def markdown(case_id: str, runs: dict[str, dict | None], detectives: dict[str, dict | None]) -> str:
    present = [v for v in VARIANTS if runs.get(v)]
    lines = [f"# Evaluation of `{case_id}`", ""]
    if present:
        any_run = runs[present[0]]
        lines += [
            f"{'Guilty' if any_run['guilty'] else 'Innocent'} suspect; base {any_run['base']}; engine "
            f"{any_run.get('engine') or 'not recorded'}; generation "
            f"{json.dumps(any_run['generation'])}. Figures from `python -m training.eval {case_id}` "
            "(definitions: docs/eval.md).", "",
            "| metric | target | " + " | ".join(present) + " |",
            "|---|---|" + "---|" * len(present),
        ]
        for metric in METRICS:
            op, target = TARGETS[metric]
            cells = []
            for v in present:
                r = runs[v]
                met = _met(r, metric)
                mark = "" if met is None or v == PROMPT_ONLY else (" ✓" if met else " ✗")
                cells.append(f"{_fmt(r.get(metric))}{mark} ({r['denominators'].get(metric, 0)})")
            lines.append(f"| {metric} | {op} {target:g} | " + " | ".join(cells) + " |")
        lines.append("| fact_accuracy_semantic (second opinion) | - | "
                     + " | ".join(_fmt(runs[v].get("fact_accuracy_semantic")) for v in present) + " |")
        lines += ["", "In brackets: how many answers (tell_rate, repeat_rate: interrogations; retest_consistency: "
                      "pairs; offscript_responsive_rate: the question bank's held-out questions) a figure is taken "
                      "over.", ""]
        for v in present:
            r = runs[v]
            lines.append(f"- {v}: adapter `{r['adapter']}` ({r['adapter_status']}), {r['n_answers']} answers to "
                         f"{r['n_probes']} probes and {r.get('n_offscript', 0)} off-script questions in "
                         f"{r['seconds']} s")
        if any(runs[v].get("ignored_contradict_phrases") for v in present):
            lines += ["", "Contradict phrases ignored because the case's own material says them: "
                      + json.dumps(runs[present[0]]["ignored_contradict_phrases"])]
    found = [v for v in VARIANTS if detectives.get(v)]
    if found:
        lines += ["", "## Scripted detective", ""]
        for v in found:
            d = detectives[v]
            lines += [f"**{v}: {'passed' if d['passed'] else 'FAILED'}** — {d['reason']}", ""]
            lines += [f"> **Q:** {e['question']}  \n> **A:** {e['answer']}\n>" for e in d["transcript"]]
            lines.append("")
    if present:
        lines += ["", "## Answers that missed", ""]
        for v in present:
            missed = [(a, why) for a in runs[v]["answers"] if (why := what_missed(a))]
            lines.append(f"### {v} ({len(missed)} of {len(runs[v]['answers'])})\n")
            for a, why in missed:
                again = " (retest)" if a["retest"] else ""
                lines.append(f"- Q{again}: {a['question']}  \n  A: {a['answer']}  \n  → {why}")
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def chart(case_id: str, runs: dict[str, dict | None], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [v for v in VARIANTS if runs.get(v)]
    metrics = [m for m in METRICS if any(runs[v].get(m) is not None for v in present)]
    width = 0.8 / len(present)
    fig, ax = plt.subplots(figsize=(8.5, 4))
    colors = {PROMPT_ONLY: "#9e9e9e", FINE_TUNED: "#1f77b4"}
    for i, v in enumerate(present):
        xs = [j + (i - (len(present) - 1) / 2) * width for j in range(len(metrics))]
        values = [runs[v].get(m) or 0.0 for m in metrics]
        bars = ax.bar(xs, values, width, label=v, color=colors[v])
        ax.bar_label(bars, labels=[_fmt(runs[v].get(m)) for m in metrics], fontsize=7, padding=1)
    for j, m in enumerate(metrics):
        op, target = TARGETS[m]
        ax.hlines(target, j - 0.45, j + 0.45, colors="#d62728", linestyles="dashed", linewidth=1,
                  label="target" if j == 0 else None)
    ax.set_xticks(range(len(metrics)), [m.replace("_", "\n") for m in metrics], fontsize=8)
    ax.set_ylim(0, 1.12)
    ax.set_title(f"{case_id}: fine-tuned vs prompt-only (held-out probes)")
    ax.legend(fontsize=8, loc="upper right", ncols=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
