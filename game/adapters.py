"""Where a case's trained suspect lives (`adapters/<case_id>/`), and whether the game may use it.

An adapter folder is a standard PEFT folder plus `training_meta.json`, written by `python -m training`.
The game uses an adapter only when it was trained on the base in use; a stale one (older than its case file)
still plays but is reported by `python -m game list`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from game.base import Base
from game.scenario import LoadedCase

META_FILE = "training_meta.json"
REQUIRED_FILES = ("adapter_config.json", "adapter_model.safetensors", META_FILE)


class Status(str, Enum):
    READY = "ready"
    STALE = "stale"  # trained on an older version of the case file; still usable
    MISSING = "missing"
    MISMATCH = "mismatch"  # trained on another base
    CORRUPT = "corrupt"


@dataclass(frozen=True)
class AdapterInfo:
    case_id: str
    path: Path
    status: Status
    message: str
    meta: dict | None = None

    @property
    def usable(self) -> bool:
        return self.status in (Status.READY, Status.STALE)


def read_meta(folder: Path) -> dict:
    meta = json.loads((folder / META_FILE).read_text())
    if not isinstance(meta, dict):
        raise ValueError(f"{META_FILE} is not a JSON object")
    return meta


def inspect(adapters_dir: Path, loaded: LoadedCase, base: Base | None) -> AdapterInfo:
    """Judge a case's adapter folder without loading any weights. With base=None the base is not checked."""
    case_id = loaded.case.id
    folder = adapters_dir / case_id
    if not folder.is_dir():
        return AdapterInfo(case_id, folder, Status.MISSING, f"no adapter in {folder}: the suspect plays prompt-only")
    absent = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if absent:
        return AdapterInfo(case_id, folder, Status.CORRUPT, f"{folder} lacks {', '.join(absent)}: playing prompt-only")
    try:
        meta = read_meta(folder)
        trained_on = meta["base_fingerprint"]
    except (OSError, ValueError, KeyError) as exc:
        return AdapterInfo(case_id, folder, Status.CORRUPT, f"{folder / META_FILE} is unreadable ({exc}): playing prompt-only")
    if base is not None and trained_on != base.fingerprint:
        return AdapterInfo(
            case_id, folder, Status.MISMATCH,
            f"adapter {folder} was trained on base '{meta.get('base_id', '?')}' ({trained_on[:28]}…), but the game runs "
            f"'{base.id}' ({base.fingerprint[:28]}…): playing prompt-only. Retrain with `python -m training {case_id}` "
            f"or start the game with that base.",
            meta,
        )
    if meta.get("case_sha256") != loaded.sha256:
        return AdapterInfo(
            case_id, folder, Status.STALE,
            f"adapter {folder} was trained on an older version of {loaded.path.name}: retrain with "
            f"`python -m training {case_id}`",
            meta,
        )
    return AdapterInfo(case_id, folder, Status.READY, f"fine-tuned suspect from {folder}", meta)
