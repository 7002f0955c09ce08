"""Which training recipe makes the best suspect: train each case with each recipe, then evaluate every adapter.

    python3 benchmarks/recipe_sweep.py --variants "r2=--rank 2 --steps 120" "r4=--rank 4 --steps 120" --jobs 12

Each variant is a name and the `python -m training` options that make it. Every (case, variant) is trained into
<work>/adapters/<variant>/<case>/, then asked the held-out probes (`python -m training.eval --json`) and played by
the scripted detective (`--detective`), all as subprocesses, --jobs at a time (one GPU runs many small trainings at
once). One JSON line per run (the recipe, the training's wall time, tokens/s, peak memory and loss, the eval's
figures) goes to <out>/recipe_sweep_<device>.jsonl as it finishes, so a run cut short keeps what it finished.
"""

# No `from __future__ import annotations`: HfArgumentParser reads the field types at runtime.
import json
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS, ROOT, device_slug  # noqa: E402
from training.scoring import METRICS  # noqa: E402

FIGURES = METRICS


@dataclass
class Arguments:
    variants: list[str] = field(metadata={"help": "NAME=OPTIONS of python -m training, one per recipe."})
    cases: list[str] = field(default_factory=list, metadata={"help": "Case ids; default: every case in scenarios/."})
    eval_options: str = field(default="", metadata={"help": "Extra options of python -m training.eval (a smoke run: "
                                                             "'--limit 1 --retest false')."})
    jobs: int = field(default=1, metadata={"help": "Runs at a time."})
    device: str = field(default="cuda", metadata={"help": "Names the result file (cuda or cpu)."})
    work: Path = field(default=Path("/tmp/sweep"), metadata={"help": "Adapters and logs go here."})
    out: Path = field(default=RESULTS, metadata={"help": "Folder of the JSONL result."})


def run(command: list[str], log: Path) -> subprocess.CompletedProcess:
    with log.open("w") as f:
        return subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=f, text=True)


def one(case_id: str, name: str, options: str, args: Arguments) -> dict:
    work = args.work
    adapter = work / "adapters" / name / case_id
    logs = work / "logs" / name
    logs.mkdir(parents=True, exist_ok=True)
    row = {"case": case_id, "variant": name, "options": options}
    train = run([sys.executable, "-m", "training", case_id, "--output", str(adapter), *shlex.split(options)],
                logs / f"{case_id}.train.log")
    if train.returncode != 0:
        return row | {"error": f"training exit {train.returncode}, see {logs / (case_id + '.train.log')}"}
    meta = json.loads((adapter / "training_meta.json").read_text())
    row["training"] = {k: meta.get(k) for k in ("backend", "device", "steps", "final_loss", "wall_s", "tokens_per_s",
                                                "peak_memory_gib")}
    row["adapter_mb"] = round((adapter / "adapter_model.safetensors").stat().st_size / 1e6, 2)
    report = work / "eval" / name
    for mode, extra in (("eval", []), ("detective", ["--detective"])):
        done = run([sys.executable, "-m", "training.eval", case_id, "--adapter", str(adapter), "--json",
                    "--report", str(report), *extra, *shlex.split(args.eval_options)], logs / f"{case_id}.{mode}.log")
        try:
            result = json.loads(done.stdout)
        except json.JSONDecodeError:
            row[mode] = {"error": f"exit {done.returncode}, see {logs / (case_id + '.' + mode + '.log')}"}
            continue
        row[mode] = ({k: result.get(k) for k in FIGURES} if mode == "eval"
                     else {"passed": result.get("passed")})
    return row


def main(args: Arguments) -> None:
    variants = dict(v.split("=", 1) for v in args.variants)
    cases = args.cases or sorted(p.stem for p in (ROOT / "scenarios").glob("*.json") if p.stem != "schema")
    args.out.mkdir(parents=True, exist_ok=True)
    result_file = args.out / f"recipe_sweep_{device_slug(args.device)}.jsonl"
    lock = threading.Lock()
    started = time.perf_counter()

    def job(pair):
        case_id, name = pair
        row = one(case_id, name, variants[name], args)
        row["finished_s"] = round(time.perf_counter() - started, 1)
        with lock, result_file.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    # In the order given: the longest recipes first let the short ones fill the gaps at the end.
    pairs = [(c, n) for n in variants for c in cases]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(job, pairs))


if __name__ == "__main__":
    from transformers import HfArgumentParser

    (arguments,) = HfArgumentParser(Arguments).parse_args_into_dataclasses()
    main(arguments)
