"""Evaluation: perplexity against a hand-written reference, zero-shot scoring on a task whose answers are known."""
from __future__ import annotations

import gzip
import math

import pytest
import torch
import torch.nn.functional as F
import transformers

import graphprune
from graphprune.evaluate import TASKS, LogitsRunner, Question, load_task, perplexity, score_questions, zeroshot
from graphprune.evaluate.zeroshot import encode_pair, loglikelihoods


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (see conftest)


@pytest.fixture(scope="module")
def stories(stories_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(stories_dir)
    text = gzip.open(stories_dir.parents[1] / "tinystories" / "valid_head.txt.gz", "rt", encoding="utf-8").read()[:12000]
    return model, tok, text


def reference_ppl(model, ids: torch.Tensor, window: int) -> float:
    """exp(mean NLL), one window at a time, written without graphprune."""
    total, count = 0.0, 0
    for start in range(0, len(ids) - window + 1, window):
        w = ids[start : start + window].unsqueeze(0)
        with torch.no_grad():
            logits = model(input_ids=w, use_cache=False).logits
        total += F.cross_entropy(logits[0, :-1], w[0, 1:], reduction="sum").item()
        count += window - 1
    return math.exp(total / count)


def test_perplexity_matches_hand_reference(stories):
    model, tok, text = stories
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
    expected = reference_ppl(model, ids[:1024], 128)
    got = perplexity(model, tok, "story", text=text, seq_len=128, max_tokens=1024, batch_size=3, progress=False)
    assert got.windows == 8 and got.tokens_scored == 8 * 127
    assert got.ppl == pytest.approx(expected, rel=0.01)
    assert 1.0 < got.ppl < 100  # the model was trained on this kind of text
    # the long protocol is capped at the model's 512 positions
    long = perplexity(model, tok, "story", text=text, seq_len="long", max_tokens=1024, progress=False)
    assert long.seq_len == 512 and long.ppl == pytest.approx(reference_ppl(model, ids[:1024], 512), rel=0.01)


def test_perplexity_on_graphs_equals_module(stories):
    model, tok, text = stories
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])[:512]
    dense = perplexity(model, ids=ids, seq_len=128, progress=False).ppl
    kept = graphprune.compile(model, ratio=0.0, progress=False)
    assert perplexity(kept.traced.module, ids=ids, seq_len=128, progress=False).ppl == pytest.approx(dense, rel=1e-5)
    assert perplexity(kept, ids=ids, seq_len=128, progress=False).ppl == pytest.approx(dense, rel=1e-5)
    pruned = graphprune.compile(model, ratio=0.5, progress=False)
    assert perplexity(pruned, ids=ids, seq_len=128, progress=False).ppl > dense  # pruning without recovery hurts


def test_perplexity_on_onnx_runtime_session(tmp_path):
    import onnxruntime as ort

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(32, 16), torch.nn.Linear(16, 32)).eval()
    path = tmp_path / "tiny.onnx"
    torch.onnx.export(model, (torch.zeros(2, 8, dtype=torch.long),), str(path), input_names=["input_ids"],
                      output_names=["logits"], dynamic_axes={"input_ids": {0: "b", 1: "s"}}, dynamo=False)
    ids = torch.randint(0, 32, (300,), generator=torch.Generator().manual_seed(1))
    expected = perplexity(model, ids=ids, seq_len=16, progress=False).ppl
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert perplexity(session, ids=ids, seq_len=16, progress=False).ppl == pytest.approx(expected, rel=1e-4)
    wrapped = graphprune.OnnxSession.open(path, "CPUExecutionProvider", quiet=True)  # graphprune.runtime's wrapper
    assert perplexity(wrapped, ids=ids, seq_len=16, progress=False).ppl == pytest.approx(expected, rel=1e-4)


def test_perplexity_errors(stories):
    model, tok, text = stories
    with pytest.raises(graphprune.GraphpruneError, match="limit of 512"):
        perplexity(model, tok, text=text, seq_len=1024, progress=False)
    with pytest.raises(graphprune.GraphpruneError, match="shorter than one window"):
        perplexity(model, tok, text=text, seq_len=128, max_tokens=100, progress=False)
    with pytest.raises(graphprune.GraphpruneError, match="unknown corpus"):
        perplexity(model, tok, "no-such-corpus", progress=False)
    with pytest.raises(graphprune.GraphpruneError, match="ids: token ids must be an integer tensor"):
        perplexity(model, tok, ids=torch.rand(600) * 100, progress=False)  # not silently truncated to ids
    with pytest.raises(graphprune.GraphpruneError, match=r"must lie in the vocabulary \[0, 512\)"):
        perplexity(model, tok, ids=torch.full((600,), 512), progress=False)


# ---------------------------------------------------------------- zero-shot
class CharTokenizer:
    """One token per character (id = position in ALPHABET); BOS = 0."""

    ALPHABET = "^ abcdefghijklmnopqrstuvwxyz:?."
    bos_token_id = 0

    def __call__(self, text, add_special_tokens=True):
        ids = [self.ALPHABET.index(c) for c in text]
        return {"input_ids": ([0] if add_special_tokens else []) + ids}


class UnigramStub(torch.nn.Module):
    """Next-token logits that ignore the context: space 10, a 9, b 8, c 7, everything else -30."""

    def __init__(self):
        super().__init__()
        logits = torch.full((len(CharTokenizer.ALPHABET),), -30.0)
        for ch, value in {" ": 10.0, "a": 9.0, "b": 8.0, "c": 7.0}.items():
            logits[CharTokenizer.ALPHABET.index(ch)] = value
        self.register_buffer("logits", logits)

    def forward(self, input_ids):
        return self.logits.expand(*input_ids.shape, -1).clone()


def test_zeroshot_on_hand_made_task_gives_expected_accuracy():
    tok, model = CharTokenizer(), UnigramStub()
    lp = torch.log_softmax(model.logits, -1)
    p = {ch: lp[CharTokenizer.ALPHABET.index(ch)].item() for ch in " abc"}
    # (context, choices, gold): by hand, with summed log-probs (acc) and per-character means (acc_norm)
    task = [("q:", ["a", "c"], 0), ("q:", ["aaa", "b"], 0), ("q:", ["c", "b"], 0)]
    questions = [Question([ctx] * len(ch), [" " + c for c in ch], gold, [len(c) for c in ch]) for ctx, ch, gold in task]
    sums = [[p[" "] + sum(p[x] for x in c) for c in ch] for _, ch, _ in task]
    by_hand_acc = sum(max(range(len(s)), key=s.__getitem__) == gold for s, (_, _, gold) in zip(sums, task)) / 3
    by_hand_norm = sum(max(range(len(s)), key=lambda i, s=s, ch=ch: s[i] / len(ch[i])) == gold
                       for s, (_, ch, gold) in zip(sums, task)) / 3
    assert (by_hand_acc, by_hand_norm) == (1 / 3, 2 / 3)  # "aaa" loses on the sum, wins per character
    acc, acc_norm, pred, pred_norm = score_questions(model, tok, questions, batch_size=2, add_bos=False)
    assert acc == pytest.approx(1 / 3) and acc_norm == pytest.approx(2 / 3)
    assert pred == [0, 1, 1] and pred_norm == [0, 0, 1]


def test_loglikelihood_values_and_context_dependence():
    tok = CharTokenizer()

    class PreferRepeat(torch.nn.Module):  # the next token is very likely a copy of the current one
        def forward(self, input_ids):
            return F.one_hot(input_ids, len(CharTokenizer.ALPHABET)).float() * 5.0

    runner = LogitsRunner(PreferRepeat())
    ctx, cont = encode_pair(tok, "ab ", "b", add_bos=True)  # the trailing space moves to the continuation
    assert ctx == [0, 2, 3] and cont == [1, 3]
    ll_same, ll_other = loglikelihoods(runner, [encode_pair(tok, "aa", "a", True), encode_pair(tok, "aa", "b", True)])
    v = len(CharTokenizer.ALPHABET)
    assert ll_same == pytest.approx(5.0 - math.log(math.exp(5.0) + v - 1), abs=1e-5)
    assert ll_other == pytest.approx(-math.log(math.exp(5.0) + v - 1), abs=1e-5)


def test_continuation_longer_than_the_context_window_is_scored_whole():
    # a bigram model sees only the current token, so windows of any length give the exact value;
    # every token of the 9-token continuation must count, though only 3 fit in a window
    tok = CharTokenizer()

    class PreferRepeat(torch.nn.Module):
        def forward(self, input_ids):
            return F.one_hot(input_ids, len(CharTokenizer.ALPHABET)).float() * 5.0

    runner = LogitsRunner(PreferRepeat())
    request = encode_pair(tok, "ab", "bbbbaaaaa", add_bos=True)
    whole = loglikelihoods(runner, [request])[0]
    windowed = loglikelihoods(runner, [request, encode_pair(tok, "a", "b", True)], max_length=3)
    v = len(CharTokenizer.ALPHABET)
    same, other = 5.0 - math.log(math.exp(5.0) + v - 1), -math.log(math.exp(5.0) + v - 1)
    assert whole == pytest.approx(8 * same + other, abs=1e-4)  # b→b ×4, b→a, a→a ×4
    assert windowed[0] == pytest.approx(whole, abs=1e-4)
    assert windowed[1] == pytest.approx(other, abs=1e-5)


def test_zeroshot_answer_longer_than_the_model_limit(stories):
    # PIQA has an answer of 626 tokens; stories260K takes 512 positions
    model, tok, text = stories
    long_answer = " " + text[:4000]
    assert len(tok(long_answer)["input_ids"]) > 512
    q = Question(["Goal: tell a story.\nSolution:"] * 2, [long_answer, " The end."], 1, [len(long_answer), 8])
    acc, acc_norm, pred, _ = score_questions(model, tok, [q], batch_size=2)
    assert pred[0] in (0, 1) and 0.0 <= acc <= 1.0


@pytest.mark.parametrize("task", TASKS)
def test_bundled_tasks_load(task):
    questions = load_task(task, max_examples=5)
    assert len(questions) == 5
    for q in questions:
        assert 2 <= len(q.contexts) <= 4 and 0 <= q.gold < len(q.contexts)
        assert all(c.startswith(" ") and not c.startswith("  ") for c in q.continuations)
    if task == "boolq":
        assert questions[0].contexts[0].endswith("?\nAnswer:") and not questions[0].contexts[0].startswith("Passage:")


def test_zeroshot_runs_on_real_model(stories):
    model, tok, _ = stories
    result = zeroshot(model, tok, tasks=("piqa", "arc_challenge"), max_examples=4, progress=False)
    assert set(result.tasks) == {"piqa", "arc_challenge"} and result.tasks["piqa"].n == 4
    assert result.tasks["arc_challenge"].metric == "acc_norm"
    assert 0.0 <= result.average <= 1.0
    with pytest.raises(graphprune.GraphpruneError, match="unknown zero-shot task"):
        zeroshot(model, tok, tasks=("mmlu",), progress=False)
