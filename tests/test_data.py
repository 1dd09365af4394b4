"""Calibration data: every accepted form, deterministic by seed, clear errors."""
import pytest
import torch

from graphprune import GraphpruneError
from graphprune.data import CORPORA, Calibration, calibration, corpus_text, load_tokenizer, model_inputs


@pytest.fixture(scope="module")
def tok(stories_dir):
    return load_tokenizer(stories_dir)


def test_corpora_are_found():
    assert corpus_text("wikitext2", "test").lstrip().startswith("= Robert Boulter =")
    assert len(corpus_text("ptb", "valid")) > 100_000
    with pytest.raises(GraphpruneError, match="splits"):
        corpus_text("ptb", "train")
    with pytest.raises(GraphpruneError, match="unknown corpus"):
        corpus_text("no-such-corpus")
    with pytest.raises(GraphpruneError, match="no such text file: missing/notes.txt"):
        corpus_text("missing/notes.txt")  # a path says it is missing, not that it is an unknown name


def test_wikitext_training_and_validation_text_has_no_unknown_word_markers():
    # the reported (raw) test split has no "<unk>"; text with them flatters methods that train on it
    from graphprune.data import data_dir, read_text

    for split in ("train", "valid"):
        marked = read_text(data_dir() / CORPORA["wikitext2"][split])
        text = corpus_text("wikitext2", split)
        assert marked.count("<unk>") > 1000 and "<unk>" not in text
        words = marked.split()
        assert text.split() == [w for w in words if w != "<unk>"]  # only the markers went
    assert corpus_text("ptb", "valid").count("<unk>") > 1000  # PTB's reported split keeps them too


def test_calibration_never_reads_the_split_perplexity_is_reported_on():
    from graphprune.data import CALIBRATION_SPLIT
    from graphprune.evaluate.perplexity import DEFAULT_SPLIT

    for corpus, splits in CORPORA.items():
        if len(splits) > 1:
            assert CALIBRATION_SPLIT[corpus] != DEFAULT_SPLIT[corpus], corpus


def test_text_passed_as_a_corpus_name_is_a_clear_error(tok):
    text = "a long text, not a file name " * 400  # longer than any file name may be
    with pytest.raises(GraphpruneError, match="list of strings"):
        calibration(text, tok)
    assert len(calibration([text], tok, n_samples=2, seq_len=16)) == 2


def test_every_form_gives_fixed_windows(tok):
    a = calibration("tinystories", tok, n_samples=3, seq_len=20, seed=1)
    b = calibration("tinystories", tok, n_samples=3, seq_len=20, seed=1)
    c = calibration("tinystories", tok, n_samples=3, seq_len=20, seed=2)
    assert a.input_ids.shape == (3, 20) and torch.equal(a.input_ids, b.input_ids)
    assert not torch.equal(a.input_ids, c.input_ids)
    texts = ["Once upon a time there was a little dog who liked to run in the park. " * 5]
    assert calibration(texts, tok, n_samples=2, seq_len=16).input_ids.shape == (2, 16)
    from datasets import Dataset

    ds = Dataset.from_dict({"text": texts})
    assert torch.equal(calibration(ds, tok, n_samples=2, seq_len=16).input_ids, calibration(texts, tok, n_samples=2, seq_len=16).input_ids)
    ids = torch.randint(0, 100, (4, 8))
    assert torch.equal(calibration(ids).input_ids, ids)
    assert calibration(a) is a
    assert [x.shape[0] for x in a.batches(2)] == [2, 1]


def test_calibration_errors(tok):
    with pytest.raises(GraphpruneError, match="tokenizer"):
        calibration("wikitext2")
    with pytest.raises(GraphpruneError, match="fewer than seq_len"):
        calibration(["tiny"], tok, seq_len=64)
    with pytest.raises(GraphpruneError, match="calib must be"):
        calibration(3.5, tok)
    with pytest.raises(GraphpruneError, match="LongTensor"):
        Calibration(torch.zeros(3))


def test_model_inputs_follow_the_example():
    example = {"input_ids": torch.zeros(2, 16, dtype=torch.long), "attention_mask": torch.ones(2, 16, dtype=torch.long), "use_cache": False}
    ids = torch.ones(3, 5, dtype=torch.long)
    out = model_inputs(example, ids)
    assert out["input_ids"] is not None and out["attention_mask"].shape == (3, 5) and out["use_cache"] is False
