"""Answer latency against players at once, from benchmarks/load.py's results (one JSON per player count).

    .venv/bin/python benchmarks/plot_load.py --results benchmarks/results/load_cpu_players*.json --out benchmarks/results/load_cpu.png

Each file is one run of `benchmarks/load.py --players N`; the plot shows answer and first-words p50 and p95 by N,
with the machine's load average at the run's start and end, since on a shared machine the figures are only as good as that.
"""

# No `from __future__ import annotations`: HfArgumentParser reads the field types at runtime.
import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Arguments:
    results: list[Path] = field(metadata={"help": "load.py result files, one per player count."})
    out: Path = field(default=Path("load_cpu.png"), metadata={"help": "Where the PNG goes."})
    title: str = field(default="Players at once on a 2-core CPU (llama.cpp, bundled adapters, whole games)",
                       metadata={"help": "The plot's title."})


def plot(runs: list[dict], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display
    import matplotlib.pyplot as plt

    runs = sorted(runs, key=lambda r: r["settings"]["players"])
    players = [r["settings"]["players"] for r in runs]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for key, name, colour in (("answer_latency_s", "answer", "tab:blue"), ("first_words_latency_s", "first words",
                                                                             "tab:orange")):
        ax.plot(players, [r[key]["p50"] for r in runs], "o-", color=colour, label=f"{name} p50")
        ax.plot(players, [r[key]["p95"] for r in runs], "s--", color=colour, label=f"{name} p95")
    for r, n in zip(runs, players):
        load = f'{r["machine"]["load_average_before"][0]:g} -> {r["machine"].get("load_average_after", ["?"])[0]:g}'
        ax.annotate(f"load {load}", (n, r["answer_latency_s"]["p95"]), textcoords="offset points", xytext=(4, 6),
                    fontsize=8, color="grey")
    ax.set_xlabel("players at once (each a whole game of five questions)")
    ax.set_ylabel("seconds")
    ax.set_xticks(players)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    from transformers import HfArgumentParser

    (arguments,) = HfArgumentParser(Arguments).parse_args_into_dataclasses()
    plot([json.loads(path.read_text()) for path in arguments.results], arguments.out, arguments.title)
    print(arguments.out)
