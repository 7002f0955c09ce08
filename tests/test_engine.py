"""The torch engine (game.engine) generates what transformers + peft generate, however requests are batched,
cached or compiled."""

from pathlib import Path

import pytest
import torch

from game.engine import BatchedEngine
from game.serving import PrefixCache, Request
from game.prompt import chat
from game.scenario import load_cases

ROOT = Path(__file__).resolve().parent.parent
CASES = ["lighthouse-logbook", "ski-lodge-bracelet"]  # two adapters, so that a batch mixes them
TOKENS = 24
MIXED = [(case_id, i) for i in range(2) for case_id in CASES]  # both prompts of both cases, alternating: batches mix


@pytest.fixture(scope="module")
def setup(base):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = load_cases(ROOT / "scenarios")
    tokenizer = AutoTokenizer.from_pretrained(base.path)
    prompts = {}
    for case_id in CASES:
        case = loaded[case_id].case
        prompts[case_id] = [tokenizer.apply_chat_template(chat(case, [], p.question), add_generation_prompt=True,
                                                          tokenize=True, return_dict=False) for p in case.probes[:2]]
    model = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32).eval()
    return model, prompts


@pytest.fixture(scope="module")
def reference(base, setup):
    """transformers' greedy generate with peft's adapter: what every engine configuration must reproduce."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, prompts = setup
    out = {}
    for case_id in CASES:
        model = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32).eval()
        model = PeftModel.from_pretrained(model, str(ROOT / "adapters" / case_id)).eval()
        for i, prompt in enumerate(prompts[case_id]):
            with torch.inference_mode():
                ids = model.generate(torch.tensor([prompt]), max_new_tokens=TOKENS,
                                     do_sample=False, repetition_penalty=1.1)
            out[case_id, i] = ids[0, len(prompt):].tolist()
    return out


def engine_of(setup, model=None, **options) -> BatchedEngine:
    model = model or setup[0]
    eos = model.generation_config.eos_token_id
    engine = BatchedEngine(model, eos=set(eos if isinstance(eos, list) else [eos]), **options)
    for case_id in CASES:
        engine.load_adapter(case_id, ROOT / "adapters" / case_id)
    return engine


def run(engine: BatchedEngine, jobs: list[tuple[str, list[int]]], sample=()) -> list[list[int]]:
    """Submit every job at once (so that they share batches), then collect each one's tokens. sample: the indexes of
    jobs that sample instead of taking the best token."""
    requests = [engine.submit(Request(prompt, case_id, 0, TOKENS, 1.1, do_sample=i in sample))
                for i, (case_id, prompt) in enumerate(jobs)]
    out = []
    for r in requests:
        tokens = []
        while (item := r.tokens.get(timeout=300)) is not None:
            if isinstance(item, BaseException):
                raise item
            tokens.append(item)
        out.append(tokens)
    return out


def test_one_request_generates_what_peft_generates(setup, reference):
    engine = engine_of(setup, max_batch=1)
    _, prompts = setup
    for case_id in CASES:
        assert run(engine, [(case_id, prompts[case_id][0])]) == [reference[case_id, 0]]


def test_a_batch_mixing_cases_generates_what_each_generates_alone(setup, reference):
    engine = engine_of(setup, max_batch=4)
    _, prompts = setup
    assert run(engine, [(c, prompts[c][i]) for c, i in MIXED]) == [reference[job] for job in MIXED]


def test_the_bare_base_in_a_batch_is_not_touched_by_the_adapters(base, setup):
    from transformers import AutoModelForCausalLM

    _, prompts = setup
    prompt = prompts[CASES[0]][0]
    model = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32).eval()
    with torch.inference_mode():
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=TOKENS,
                                  do_sample=False, repetition_penalty=1.1)[0, len(prompt):].tolist()
    engine = engine_of(setup, max_batch=2)
    requests = [engine.submit(Request(prompt, None, 0, TOKENS, 1.1)),
                engine.submit(Request(prompt, CASES[0], 0, TOKENS, 1.1))]
    tokens = []
    while (item := requests[0].tokens.get(timeout=300)) is not None:
        tokens.append(item)
    assert tokens == expected


def test_a_prompt_found_in_the_prefix_cache_generates_the_same(setup, reference):
    engine = engine_of(setup, max_batch=1)
    _, prompts = setup
    case_id = CASES[0]
    prompt = prompts[case_id][1]
    shared = next(n for n, (a, b) in enumerate(zip(prompts[case_id][0], prompt)) if a != b)
    first = engine.submit(Request(prompts[case_id][0], case_id, shared, TOKENS, 1.1))
    while first.tokens.get(timeout=300) is not None:
        pass
    second = engine.submit(Request(prompt, case_id, shared, TOKENS, 1.1))
    tokens = []
    while (item := second.tokens.get(timeout=300)) is not None:
        tokens.append(item)
    assert second.cached_tokens >= shared - shared % 16 > 0
    assert tokens == reference[case_id, 1]


def test_an_adapter_merged_into_the_base_generates_the_same(setup, reference):
    engine = engine_of(setup, max_batch=2, merge=True)
    _, prompts = setup
    for case_id in CASES:  # one adapter per step: merged; the second case re-merges
        assert run(engine, [(case_id, prompts[case_id][1])]) == [reference[case_id, 1]]
    assert engine.model.merged == CASES[-1]


def test_a_compiled_step_generates_the_same(setup, reference):
    engine = engine_of(setup, max_batch=2, compile=True)
    _, prompts = setup
    jobs = [(case_id, prompts[case_id][0]) for case_id in CASES]
    assert run(engine, jobs) == [reference[job] for job in [(c, 0) for c in CASES]]
    assert engine._decode != engine.model.decode  # it ran compiled, not after falling back to eager


def test_steps_launched_before_the_last_tokens_are_handed_out_generate_the_same(setup, reference):
    """overlap (the CUDA default): with more requests than rows, rows are freed and refilled while a step is in
    flight, and a finished row's extra step is dropped."""
    engine = engine_of(setup, max_batch=2, overlap=True)
    _, prompts = setup
    assert run(engine, [(c, prompts[c][i]) for c, i in MIXED]) == [reference[job] for job in MIXED]


def test_a_sampling_row_leaves_its_greedy_neighbour_greedy(setup, reference):
    torch.manual_seed(0)
    engine = engine_of(setup, max_batch=2)
    _, prompts = setup
    case_id = CASES[0]
    greedy, sampled = run(engine, [(case_id, prompts[case_id][0])] * 2, sample={1})
    assert greedy == reference[case_id, 0]
    assert sampled and sampled != greedy


@pytest.mark.gpu
def test_cuda_graphs_compiled_and_overlapped_generate_the_same(setup, reference):
    """The CUDA defaults (compiled layer, graphed prefills and steps, merged lone adapter, overlap), in fp32."""
    import copy

    engine = engine_of(setup, copy.deepcopy(setup[0]).to("cuda"), max_batch=4)
    assert engine.compile and engine.cuda_graphs and engine.model.merge and engine.overlap
    _, prompts = setup
    assert run(engine, [(c, prompts[c][i]) for c, i in MIXED]) == [reference[job] for job in MIXED]
    assert run(engine, [(CASES[0], prompts[CASES[0]][1])]) == [reference[CASES[0], 1]]  # alone: merged
    assert engine.cuda_graphs and engine._decode != engine.model.decode  # no fallback was needed
    assert any(key[0] == "prefill" for key in engine._graphs)


def test_a_failing_compiled_step_falls_back_to_the_eager_one(setup, reference):
    engine = engine_of(setup, max_batch=1)

    def broken(*args):
        raise RuntimeError("no compiler here")

    engine._decode = broken
    _, prompts = setup
    assert run(engine, [(CASES[0], prompts[CASES[0]][0])]) == [reference[CASES[0], 0]]
    assert engine._decode == engine.model.decode


def test_the_prefix_cache_keeps_pinned_system_prompts_when_conversations_fill_it():
    cache = PrefixCache(budget_bytes=300)
    system = list(range(16))
    cache.put("case", system, "system kv", 100, pin=True)
    cache.put("case", system + [1000] * 16, "game on this case", 100)  # continues the system prompt
    for game in range(5):  # another case's conversations push the oldest out, not the pinned system prompt
        cache.put("other", [2000 + game] * 32, f"game {game}", 100)
    assert cache.longest("case", system + [1000] * 16)[1] == 16  # the game on this case is gone...
    key, length = cache.longest("case", system + [7] * 16)
    assert cache.get(key) == "system kv" and length == 16  # ...and its system prompt is still found
    assert cache.longest("other", [2004] * 32)[1] == 32  # the newest conversation is there
    assert cache.longest("other", [2000] * 32)[1] == 0  # the oldest is gone
    assert cache.used <= 300
