"""Local text corpora and calibration sets (nothing is downloaded).

Corpora live in the shared data folder (``GRAPHPRUNE_DATA``, else ``../shared/data`` beside the
repository): WikiText-2, PTB and a TinyStories excerpt. ``calibration`` turns any of the accepted
forms (corpus name, path, ``datasets.Dataset``, list of strings, token tensor) into a fixed
``Calibration`` set of ``n_samples`` random windows of ``seq_len`` tokens, reproducible by seed.
"""
from __future__ import annotations

import gzip
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import GraphpruneError

# name -> split -> file inside the data folder
CORPORA = {
    "wikitext2": {"test": "wikitext2/wiki.test.raw", "valid": "wikitext2/valid.txt", "train": "wikitext2/train.txt.gz"},
    "ptb": {"valid": "ptb/valid.txt", "test": "ptb/test.txt"},
    "tinystories": {"valid": "tinystories/valid_head.txt.gz"},
}
# the split used to calibrate: never the one perplexity is reported on (PTB is reported on its
# validation split, LLM-Pruner's convention, so it calibrates on test; TinyStories has one split only)
CALIBRATION_SPLIT = {"wikitext2": "train", "ptb": "test", "tinystories": "valid"}
# WikiText-2's train and validation files are the tokenised release, where rare words read "<unk>";
# its test split is the raw one, with the words themselves. Text with the marker flatters exactly the
# methods that train on it (" <unk>" is three BPE tokens, two of them free once the first is seen):
# LoRAPrune at 20% was within 1% of dense on validation text with markers, 19% worse without them.
# So the marker is dropped. (PTB keeps its "<unk>": its reported split has them too.)
DROPPED_MARKERS = {"wikitext2": re.compile(r" ?<unk>")}


def data_dir() -> Path:
    """The shared data folder: ``$GRAPHPRUNE_DATA``, else ``../shared/data`` beside the repository or cwd."""
    env = os.environ.get("GRAPHPRUNE_DATA")
    candidates = [Path(env)] if env else []
    repo = Path(__file__).resolve().parent.parent
    candidates += [repo.parent / "shared" / "data", Path.cwd().parent / "shared" / "data", Path.cwd() / "shared" / "data"]
    for c in candidates:
        if c.is_dir():
            return c
    raise GraphpruneError(
        "the shared data folder was not found: set GRAPHPRUNE_DATA to it (looked in "
        + ", ".join(str(c) for c in candidates) + ")"
    )


def read_text(path: str | os.PathLike) -> str:
    path = Path(path)
    if not path.is_file():
        raise GraphpruneError(f"no such text file: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError, EOFError) as exc:
        raise GraphpruneError(f"could not read {path}: {exc}") from exc


def corpus_text(name: str, split: str = "test") -> str:
    """The text of a bundled corpus split, or of a ``.txt``/``.txt.gz`` file when ``name`` is a path.

    WikiText-2's train and validation text comes without its ``<unk>`` markers (see ``DROPPED_MARKERS``).
    """
    if name in CORPORA:
        splits = CORPORA[name]
        if split not in splits:
            raise GraphpruneError(f"corpus {name!r} has splits {sorted(splits)}, not {split!r}")
        text = read_text(data_dir() / splits[split])
        return DROPPED_MARKERS[name].sub("", text) if name in DROPPED_MARKERS else text
    if _is_file(name):
        return read_text(name)
    shown = name if len(name) <= 80 else name[:77] + "..."
    if len(name) <= 4096 and "\n" not in name and (Path(name).suffix or os.sep in name):
        raise GraphpruneError(f"no such text file: {shown} (nor a bundled corpus: {sorted(CORPORA)})")
    raise GraphpruneError(f"unknown corpus {shown!r}: use one of {sorted(CORPORA)} or a path to a text file "
                          "(text itself goes in a list of strings)")


def check_text_source(name: str) -> str:
    """A bundled corpus name or an existing file (text or instruction JSON), else the error
    :func:`corpus_text` would give, raised before any work."""
    if name not in CORPORA and not _is_file(name):
        corpus_text(name)  # raises, saying "no such text file" for a path, "unknown corpus" for a name
    return name


def _is_file(name: str) -> bool:
    try:
        return Path(name).is_file()
    except (OSError, ValueError):  # a long text or one with NUL bytes is no file name
        return False


def as_tokenizer(tokenizer):
    """``tokenizer`` itself, or the one :func:`load_tokenizer` finds at a path; a clear error for anything else."""
    if isinstance(tokenizer, (str, os.PathLike)):
        return load_tokenizer(tokenizer)
    if tokenizer is not None and not callable(tokenizer):
        raise GraphpruneError(f"tokenizer must be a tokenizer or the path of a folder holding one, got {type(tokenizer).__name__}")
    return tokenizer


def load_tokenizer(model_or_path):
    """The tokenizer of a local Hugging Face folder, a GGUF file, or a model loaded from one."""
    from transformers import AutoTokenizer

    path = model_or_path
    gguf = None
    if isinstance(model_or_path, torch.nn.Module):
        path = getattr(getattr(model_or_path, "config", None), "name_or_path", None) or getattr(model_or_path, "name_or_path", None)
        if not path:
            raise GraphpruneError("the model does not say where it was loaded from: pass tokenizer=...")
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        path, gguf = path.parent, path.name
    elif path.is_dir() and not (path / "tokenizer.json").exists() and not (path / "tokenizer_config.json").exists():
        ggufs = sorted(path.glob("*.gguf"))
        gguf = ggufs[0].name if ggufs else None
    if not path.exists():
        raise GraphpruneError(f"no local tokenizer at {path}: pass tokenizer=... (nothing is downloaded)")
    try:
        return AutoTokenizer.from_pretrained(str(path), gguf_file=gguf) if gguf else AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:
        raise GraphpruneError(f"could not load a tokenizer from {path}: {type(exc).__name__}: {exc}") from exc


def tokenize(text: str, tokenizer) -> torch.Tensor:
    """Token ids of ``text`` as one 1-D LongTensor (no special tokens added)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "longer than the model's maximum length" is expected here
    try:
        ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    finally:
        hf_logging.set_verbosity(level)
    return torch.as_tensor(ids, dtype=torch.long)


@dataclass
class Calibration:
    """A fixed calibration set: ``input_ids`` of shape [n_samples, seq_len]."""

    input_ids: torch.Tensor

    def __post_init__(self):
        if self.input_ids.dim() != 2 or self.input_ids.dtype != torch.long or self.input_ids.numel() == 0:
            raise GraphpruneError(f"calibration ids must be a non-empty LongTensor [n_samples, seq_len], got {tuple(self.input_ids.shape)} {self.input_ids.dtype}")

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    def batches(self, batch_size: int = 1) -> Iterator[torch.Tensor]:
        for i in range(0, len(self), batch_size):
            yield self.input_ids[i : i + batch_size]


def check_size(value, name: str, minimum: int = 1) -> int:
    """An integer argument (a count or a length) of at least ``minimum``, else an error naming it."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise GraphpruneError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_seq_len(seq_len, limit: int | None = None) -> int:
    """A window length: >= 2 (one token predicts nothing) and within the model's ``limit`` of positions.

    Shared by perplexity, compile's calibration and finetune, so each fails up front alike instead of
    in torch.export's guard, or training silently past the positions the model has.
    """
    check_size(seq_len, "seq_len", 2)
    if limit and seq_len > limit:
        raise GraphpruneError(f"seq_len={seq_len} is longer than the model's limit of {limit} positions")
    return seq_len


def model_limits(model) -> tuple[int | None, int | None]:
    """(position limit, vocabulary size) from the model's config as evaluation reads it; None where unknown."""
    from .evaluate.runner import LogitsRunner

    try:
        runner = LogitsRunner(model)
    except GraphpruneError:
        return None, None  # not a model at all: the caller's own checks say so
    vocab = runner.config.get("vocab_size")
    return runner.max_length(), (vocab if isinstance(vocab, int) and vocab > 0 else None)


def window_width(data, seq_len):
    """The sequence length ``data`` will be cut to: its own width for ready windows (2-D ids), else ``seq_len``."""
    if isinstance(data, Calibration):
        return data.seq_len
    if isinstance(data, torch.Tensor) and data.dim() == 2:
        return data.shape[1]
    return seq_len


def check_token_ids(ids, vocab: int | None = None, what: str = "calib"):
    """Token ids must be integers (a float tensor would be truncated to ids silently) inside the vocabulary."""
    data = ids.input_ids if isinstance(ids, Calibration) else ids
    if not isinstance(data, torch.Tensor):
        return ids
    if data.is_floating_point() or data.is_complex() or data.dtype == torch.bool:
        raise GraphpruneError(f"{what}: token ids must be an integer tensor, got {data.dtype}")
    if data.numel() and (int(data.min()) < 0 or (vocab and int(data.max()) >= vocab)):
        raise GraphpruneError(f"{what}: token ids must lie in the vocabulary [0, {vocab or '?'}), "
                              f"got ids from {int(data.min())} to {int(data.max())}")
    return ids


def check_fits(model, data, seq_len: int, what: str) -> None:
    """Before any tokenizing or tracing: ``data``'s windows fit the model's positions and its ids
    its vocabulary (for compile's calibration and finetune's training text alike)."""
    limit, vocab = model_limits(model)
    check_seq_len(window_width(data, seq_len), limit)
    check_token_ids(data, vocab, what)


def _windows(stream: torch.Tensor, n_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    if stream.numel() < seq_len + 1:
        raise GraphpruneError(f"calibration text has {stream.numel()} tokens, fewer than seq_len={seq_len}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seq_len, (n_samples,), generator=gen)
    return torch.stack([stream[s : s + seq_len] for s in starts.tolist()])


def calibration(calib, tokenizer=None, n_samples: int = 16, seq_len: int = 128, seed: int = 0) -> Calibration:
    """A :class:`Calibration` set from a corpus name, path, Dataset, list of strings or token tensor."""
    if isinstance(calib, Calibration):
        return calib
    check_size(n_samples, "n_samples")
    check_seq_len(seq_len)
    if isinstance(calib, torch.Tensor):
        ids = check_token_ids(calib).long()
        if ids.dim() == 1:
            return Calibration(_windows(ids, n_samples, seq_len, seed))
        return Calibration(ids)
    if isinstance(calib, str):
        text = corpus_text(calib, CALIBRATION_SPLIT[calib]) if calib in CORPORA else corpus_text(calib)
    elif isinstance(calib, (list, tuple)) and all(isinstance(s, str) for s in calib):
        text = "\n\n".join(calib)
    elif hasattr(calib, "column_names"):  # a datasets.Dataset
        if "text" not in calib.column_names:
            raise GraphpruneError(f"the calibration Dataset needs a 'text' column; it has {calib.column_names}")
        text = "\n\n".join(t for t in calib["text"] if t)
    else:
        raise GraphpruneError(
            f"calib must be a corpus name {sorted(CORPORA)}, a text file path, a datasets.Dataset, a list of "
            f"strings or a LongTensor of token ids; got {type(calib).__name__}"
        )
    tokenizer = as_tokenizer(tokenizer)
    if tokenizer is None:
        raise GraphpruneError("text calibration data needs a tokenizer: pass tokenizer=... (or token ids)")
    if not text.strip():
        raise GraphpruneError("the calibration text is empty")
    budget = 64 * n_samples * seq_len  # characters: plenty of tokens, without tokenizing a whole corpus
    if len(text) > 2 * budget:
        start = int(torch.randint(0, len(text) - budget, (1,), generator=torch.Generator().manual_seed(seed)))
        text = text[start : start + budget]
    return Calibration(_windows(tokenize(text, tokenizer), n_samples, seq_len, seed))


def model_inputs(example_kwargs: dict, input_ids: torch.Tensor) -> dict:
    """Keyword inputs for a traced graph at ``input_ids``' shape (masks all ones, flags kept)."""
    out = {}
    for name, value in example_kwargs.items():
        if name == "input_ids":
            out[name] = input_ids.to(value.device)
        elif name == "position_ids":
            out[name] = torch.arange(input_ids.shape[1], device=value.device).expand(input_ids.shape[0], -1)
        elif isinstance(value, torch.Tensor):
            shape = list(value.shape)
            shape[0] = input_ids.shape[0]
            if len(shape) > 1:
                shape[1] = input_ids.shape[1]
            out[name] = torch.ones(shape, dtype=value.dtype, device=value.device)
        else:
            out[name] = value
    if "input_ids" not in out:
        raise GraphpruneError(f"the traced graph takes no input_ids (inputs: {list(example_kwargs)})")
    return out
