"""`python -m training CASE_ID [--base B] [--output DIR] [--steps N | --epochs E] [--rank R] [--lr LR] [--seed S]
[--backend auto|unsloth|hf] [--jobs N] [--resume] [--data F]`: build a case's suspect adapter (see training/train.py)."""

import time

STARTED = time.perf_counter()  # a case's --minutes count from here: the imports below take seconds on a CPU

import logging  # noqa: E402
import sys  # noqa: E402

from training.model import early_imports  # noqa: E402

early_imports(sys.argv[1:])  # before the parser loads trl: Unsloth must patch transformers/trl/peft first

from game.base import BaseModelError  # noqa: E402
from training.config import TrainingError, parse  # noqa: E402
from training.data import DataError  # noqa: E402
from training.train import main  # noqa: E402

logging.basicConfig(level=logging.INFO, format="%(message)s")
args = parse(sys.argv[1:])
try:
    main(*args, started=STARTED)
except (DataError, TrainingError, BaseModelError) as exc:
    sys.exit(f"error: {exc}")
except KeyboardInterrupt:
    sys.exit("interrupted: the previous adapter, if any, is untouched; `--resume` continues from the last checkpoint")
