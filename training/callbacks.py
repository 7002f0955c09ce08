"""What watches a training run from beside trl's SFTTrainer: the tokens its batches hold, counted on the host
(TokenCount), its training time and tokens (step_meter), and the --minutes budget that drops the steps that would
not end in time (time_budget)."""

from __future__ import annotations

import functools
import logging
import statistics
import time

log = logging.getLogger("training")

# --minutes: the steps whose median time is the pace (after a first one that pays one-off costs), and the seconds
# kept for what follows training, the sample answer and the writing of the folder (~3-6 s on 2 cores).
PACE_STEPS = 5
AFTER_TRAINING_S = 10.0


class TokenCount:
    """The trainer's collator, counting the tokens (not padding) of the batches it builds, on the host."""

    def __init__(self, collate):
        self.collate, self.tokens = collate, 0

    def __call__(self, examples):
        batch = self.collate(examples)
        mask = batch.get("attention_mask")
        self.tokens += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
        return batch


def step_meter(trainer):
    """A callback measuring training time and tokens of this process (a resumed run counts only what it trained)."""
    from transformers import TrainerCallback  # here, not at the top: Unsloth must be imported before transformers

    counted = isinstance(trainer.data_collator, TokenCount)  # else transformers' count (Unsloth, --step_metrics)

    def seen(state) -> int:
        return trainer.data_collator.tokens if counted else state.num_input_tokens_seen

    class Meter(TrainerCallback):
        def __init__(self):
            self.seconds, self.tokens = 0.0, 0
            self._t0 = self._tokens0 = None

        def on_step_begin(self, args, state, control, **kwargs):
            if self._t0 is None:  # the first step, after any checkpoint has been loaded (its batch is built by now)
                self._t0, self._tokens0 = time.perf_counter(), 0 if counted else state.num_input_tokens_seen

        def on_train_end(self, args, state, control, **kwargs):
            if self._t0 is not None:
                self.seconds = time.perf_counter() - self._t0
                self.tokens = seen(state) - self._tokens0

    return Meter()


def time_budget(seconds: float, started: float):
    """A callback that ends training in time for the case's wall-clock budget, counted from `started`
    (perf_counter), what follows training included (AFTER_TRAINING_S). After every step once PACE_STEPS have been
    timed after the first, the pace of the last PACE_STEPS says how many of the planned steps end within the budget:
    the ones past it are dropped (back again if the pace picks up), and the learning rate's decay ends at the last step
    kept."""
    from transformers import TrainerCallback

    class Budget(TrainerCallback):
        def __init__(self):
            self.planned = None
            self.ends: list[float] = []  # when each step of this run ended; the first pays one-off costs

        def on_step_end(self, args, state, control, lr_scheduler=None, **kwargs):
            now = time.perf_counter()
            self.ends.append(now)
            if self.planned is None:
                self.planned = state.max_steps
            if len(self.ends) <= PACE_STEPS:
                return
            recent = self.ends[-PACE_STEPS - 1:]
            # the median: a step slowed by a neighbour on a shared machine does not cut the rest
            pace = statistics.median(b - a for a, b in zip(recent, recent[1:]))
            fit = state.global_step + max(0, int((started + seconds - AFTER_TRAINING_S - now) // pace))
            keep = min(self.planned, fit)
            if keep != state.max_steps:
                if state.max_steps == self.planned:  # said as the whole plan is cut; the steps trained are in the meta
                    log.info("%.1f s a step here: %d of the %d steps end within %g minutes", pace, keep, self.planned,
                             seconds / 60)
                state.max_steps = keep
                decay_to(lr_scheduler, keep)
            if state.global_step >= state.max_steps:
                control.should_training_stop = True

    return Budget()


def decay_to(scheduler, steps: int) -> None:
    """The schedule's decay moved to end at `steps`: transformers' schedules are LambdaLRs of a partial taking
    `num_training_steps` (linear, cosine, polynomial...); one without it (constant) has nothing to move."""
    for i, lr_lambda in enumerate(getattr(scheduler, "lr_lambdas", ())):
        if isinstance(lr_lambda, functools.partial) and "num_training_steps" in lr_lambda.keywords:
            scheduler.lr_lambdas[i] = functools.partial(lr_lambda.func, *lr_lambda.args,
                                                        **lr_lambda.keywords | {"num_training_steps": steps})
