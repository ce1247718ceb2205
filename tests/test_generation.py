"""Captioning decoders (models/generation.py, Blip2Qformer.generate) against independent computations.

* The Q-Former's cached decoder (generate's path) against uncached passes (the ITG path, queries + text jointly).
* Beam search with one beam against greedy decoding that re-runs the whole (uncached) decoder at every step.
* Beam search with enough beams against an exhaustive search over every sequence of a toy decoder.
* The repetition penalty against a per-element loop and transformers' RepetitionPenaltyLogitsProcessor.
* Nucleus sampling: greedy at a tiny top_p, draws within the nucleus, the nucleus' distribution, padding.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

import models.blip2_qformer as blip2_qformer
from models.blip2_qformer import Blip2Qformer
from models.generation import apply_repetition_penalty, beam_search, nucleus_sampling
from models.qformer import causal_mask_with_query_prefix, unilm_mask

BOS, PAD, EOS = 30, 0, 3
VOCAB, NUM_QUERY = 40, 4


# -------------------------------------------------------------------------------------------- the tiny model

@pytest.fixture(scope="module")
def model():
    """A tiny random stage-1 model in eval mode, its weights moved well off BERT's initialisation (std 0.02, which
    gives near-uniform logits and hence near-ties in the argmax) and eos made likely enough to end some captions."""
    torch.manual_seed(0)
    m = Blip2Qformer({"bos": BOS, "pad": PAD, "eos": EOS}, vision="eva_tiny", image_size=32, qformer="tiny",
                     vocab_size=VOCAB, num_query_tokens=NUM_QUERY, vit_precision="fp32").eval()
    with torch.no_grad():
        for name, p in m.Qformer.named_parameters():
            p.add_(0.05 * torch.randn_like(p))
        m.Qformer.bert.embeddings.word_embeddings.weight.mul_(5.0)
        m.query_tokens.normal_(0.0, 1.0)
        m.Qformer.cls.predictions.bias[EOS] += 5.6
    return m


@pytest.fixture(scope="module")
def images():
    return torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def joint_logits(model, image_embeds, text):
    """Logits after each position of text [B, L] ([DEC] first) from one uncached pass of the queries and the text
    under the UniLM mask: [B, L, V]."""
    queries = model.query_tokens.expand(image_embeds.shape[0], -1, -1)
    hidden, _ = model.Qformer.bert(text, queries, unilm_mask(NUM_QUERY, torch.ones_like(text)), image_embeds)
    return model.Qformer.lm_logits(hidden[:, NUM_QUERY:]).float()


def capture_search(model, images, monkeypatch, name="beam_search"):
    """The arguments generate hands to the search (first_logits, cache, step, ...), the search itself not run."""
    captured = {}

    def fake(**kwargs):
        captured.update(kwargs)
        return torch.zeros(images.shape[0], 1, dtype=torch.long)

    monkeypatch.setattr(blip2_qformer, name, fake)  # the search generate() calls
    model.generate(images)
    monkeypatch.undo()
    return captured


@torch.no_grad()
def test_cached_decoder_matches_uncached_passes(model, images, monkeypatch):
    batch, length = images.shape[0], 7
    tokens = torch.randint(4, VOCAB, (batch, length), generator=torch.Generator().manual_seed(2))
    tokens[0, 2] = BOS  # any id, [DEC] and eos included
    tokens[1, 3] = EOS
    text = torch.cat([torch.full((batch, 1), BOS), tokens], 1)

    # (a) generate's own path: queries + [DEC] under the UniLM mask, then one token at a time with `past`.
    search = capture_search(model, images, monkeypatch)
    incremental, cache = [search["first_logits"]], search["cache"]
    for i in range(length):
        logits, cache = search["step"](tokens[:, i], cache, i + 1)
        incremental.append(logits)
    incremental = torch.stack(incremental, 1)
    assert [k.shape[2] for k, _ in cache] == [NUM_QUERY + 1 + length] * len(cache)

    # (b) the ITG path: [DEC] + tokens in one causal pass over the cached query keys/values.
    image_embeds = model.image_embeddings(images)
    _, query_cache = model.query_outputs(image_embeds)
    hidden, _ = model.Qformer.bert(text, mask=causal_mask_with_query_prefix(torch.ones_like(text), NUM_QUERY),
                                   past=query_cache)
    itg = model.Qformer.lm_logits(hidden).float()

    # (c) queries and [DEC] + tokens in one pass under the UniLM mask.
    joint = joint_logits(model, image_embeds, text)

    assert incremental.shape == itg.shape == joint.shape == (batch, length + 1, VOCAB)
    assert incremental.abs().max() > 1.0  # not a degenerate comparison
    assert (incremental - itg).abs().max() < 1e-5
    assert (incremental - joint).abs().max() < 1e-5
    # The logits depend on the whole prefix and on the image (a decoder ignoring either would pass the above).
    assert (joint[:, 1:] - joint[:, :-1]).abs().amax((1, 2)).min() > 1e-2
    assert (joint[1:] - joint[:-1]).abs().amax((1, 2)).min() > 1e-2


@torch.no_grad()
def test_itg_loss_matches_joint_pass_with_padding(model, images):
    """itg_loss (cached queries, causal mask, padding) equals the cross-entropy of the joint UniLM pass computed
    row by row on the unpadded text."""
    batch = images.shape[0]
    gen = torch.Generator().manual_seed(3)
    lengths = [7, 3, 5, 7, 2, 4]
    input_ids = torch.full((batch, 7), PAD)
    attention_mask = torch.zeros(batch, 7, dtype=torch.long)
    for b, n in enumerate(lengths):
        input_ids[b, :n] = torch.randint(4, VOCAB, (n,), generator=gen)
        input_ids[b, 0] = 1  # [CLS], replaced by [DEC]
        input_ids[b, n - 1] = EOS
        attention_mask[b, :n] = 1
    image_embeds = model.image_embeddings(images)
    loss = model.itg_loss(input_ids, attention_mask, model.query_outputs(image_embeds)[1])

    losses = []
    for b, n in enumerate(lengths):
        text = input_ids[b:b + 1, :n].clone()
        text[0, 0] = BOS
        logits = joint_logits(model, image_embeds[b:b + 1], text)[0, :-1]
        losses.append(F.cross_entropy(logits, text[0, 1:], label_smoothing=0.1, reduction="none"))
    assert torch.allclose(loss, torch.cat(losses).mean(), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------- greedy on the tiny model

def penalise(logits, generated, penalty):
    """The repetition penalty, one element at a time: logits [V] (a copy is returned), generated: a list of ids."""
    logits = logits.clone()
    for token in set(generated):
        value = logits[token]
        logits[token] = value / penalty if value > 0 else value * penalty
    return logits


@torch.no_grad()
def greedy_reference(model, images, max_new_tokens, min_new_tokens, repetition_penalty=1.0, margin=1e-4):
    """Greedy decoding that re-runs the whole uncached decoder (queries + [DEC] + prefix) at every step."""
    image_embeds = model.image_embeddings(images)
    outputs = []
    for b in range(images.shape[0]):
        generated = []
        while len(generated) < max_new_tokens:
            text = torch.tensor([[BOS] + generated])
            logits = penalise(joint_logits(model, image_embeds[b:b + 1], text)[0, -1], generated, repetition_penalty)
            if len(generated) < min_new_tokens:
                logits[EOS] = float("-inf")
            top = logits.topk(2).values
            assert top[0] - top[1] > margin, "near-tie in the reference: change the seed"
            generated.append(logits.argmax().item())
            if generated[-1] == EOS:
                break
        outputs.append(generated)
    length = max(map(len, outputs))
    return torch.tensor([s + [PAD] * (length - len(s)) for s in outputs])


@pytest.mark.parametrize("max_new_tokens, min_new_tokens, repetition_penalty",
                         [(8, 0, 1.0), (8, 3, 1.0), (6, 2, 1.5), (1, 0, 1.0)])
def test_one_beam_is_greedy(model, images, max_new_tokens, min_new_tokens, repetition_penalty):
    expected = greedy_reference(model, images, max_new_tokens, min_new_tokens, repetition_penalty)
    out = model.generate(images, num_beams=1, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                         repetition_penalty=repetition_penalty)
    assert torch.equal(out, expected), (out, expected)
    if max_new_tokens > 1:  # rows that end early (then padded) and rows that run to the maximum
        assert (expected[:, -1] == PAD).any() and (expected[:, -1] != PAD).any(), expected
    # Nucleus sampling with a nucleus of one token is greedy too.
    torch.manual_seed(0)
    sampled = model.generate(images, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, top_p=1e-6,
                             repetition_penalty=repetition_penalty, use_nucleus_sampling=True)
    assert torch.equal(sampled, expected), (sampled, expected)


def test_generate_beams_are_well_formed(model, images):
    out = model.generate(images, num_beams=3, max_new_tokens=7, min_new_tokens=2)
    check_well_formed(out, 7, 2)


# ----------------------------------------------------------------------------------------- a toy decoder

TOY_VOCAB, TOY_EOS, TOY_PAD = 6, 2, 0


class ToyDecoder:
    """Logits of the next token = start[b] (first step) or A[last] + B[second last or start marker], plus C[b]:
    they depend on the last two tokens and on the input b, which the cache carries (history and input id), so that
    a search that reorders the cache wrongly sees other logits."""

    def __init__(self, batch, seed, eos_bias=0.0, scale=2.0):
        g = torch.Generator().manual_seed(seed)
        v = TOY_VOCAB
        self.start = torch.randn(batch, v, generator=g) * scale
        self.A = torch.randn(v, v, generator=g) * scale
        self.B = torch.randn(v + 1, v, generator=g)
        self.C = torch.randn(batch, v, generator=g)
        self.A[:, TOY_EOS] += eos_bias
        self.batch = batch

    def logits(self, b, prefix):
        if not prefix:
            return self.start[b].clone()
        return self.A[prefix[-1]] + self.B[prefix[-2] if len(prefix) > 1 else TOY_VOCAB] + self.C[b]

    def initial(self):
        """(first_logits [B, V], cache) for the searches."""
        history = torch.zeros(self.batch, 0)
        rows = torch.arange(self.batch, dtype=torch.float)[:, None]
        return self.start.clone(), [(history, rows), (history.clone(), rows.clone())]

    def step(self, tokens, cache, num_generated):
        history = torch.cat([cache[0][0], tokens[:, None].float()], 1)
        assert num_generated == history.shape[1]
        rows = cache[0][1]
        logits = torch.stack([self.logits(int(r), [int(t) for t in h]) for h, r in zip(history, rows[:, 0])])
        return logits, [(history, rows), (history.clone(), rows.clone())]

    def log_prob(self, b, sequence, min_new_tokens=0, repetition_penalty=1.0):
        """Sum of the log-probabilities of `sequence` under the search's processing (penalty, eos suppressed)."""
        total = 0.0
        for i, token in enumerate(sequence):
            logits = penalise(self.logits(b, sequence[:i]), sequence[:i], repetition_penalty)
            if i < min_new_tokens:
                logits[TOY_EOS] = float("-inf")
            total += torch.log_softmax(logits.double(), 0)[token].item()
        return total

    def next_probs(self, b, prefix, min_new_tokens, repetition_penalty):
        logits = penalise(self.logits(b, prefix), prefix, repetition_penalty)
        if len(prefix) < min_new_tokens:
            logits[TOY_EOS] = float("-inf")
        return torch.softmax(logits.double(), 0)


def exhaustive_best(toy, b, max_new_tokens, min_new_tokens, repetition_penalty, length_penalty):
    """The best (score, sequence) over every sequence that ends at its first eos or at max_new_tokens (a walk of
    the whole tree of sequences, summing log-probabilities along each path)."""
    best = [float("-inf"), None]

    def offer(seq, total):
        score = total / len(seq) ** length_penalty
        if score > best[0]:
            best[:] = [score, seq]

    def walk(prefix, total):
        log_probs = toy.next_probs(b, prefix, min_new_tokens, repetition_penalty).log().tolist()
        for token, log_prob in enumerate(log_probs):
            if log_prob == float("-inf"):
                continue
            seq = prefix + [token]
            if token == TOY_EOS or len(seq) == max_new_tokens:
                offer(seq, total + log_prob)
            else:
                walk(seq, total + log_prob)

    walk([], 0.0)
    return tuple(best)


def strip(row):
    row = row.tolist()
    return row[:row.index(TOY_EOS) + 1] if TOY_EOS in row else row


def check_well_formed(out, max_new_tokens, min_new_tokens, eos=EOS, pad=PAD):
    assert out.dtype == torch.long and 1 <= out.shape[1] <= max_new_tokens
    for row in out.tolist():
        end = row.index(eos) + 1 if eos in row else len(row)
        assert eos not in row[:min_new_tokens], row          # no eos among the first min_new_tokens
        assert all(t == pad for t in row[end:]), row          # padding after eos
        assert eos in row or len(row) == max_new_tokens, row  # else cut at the maximum
    return out


@pytest.mark.parametrize("length_penalty, min_new_tokens, repetition_penalty, seed",
                         [(1.0, 0, 1.0, 0), (0.0, 0, 1.0, 1), (1.0, 2, 1.0, 2), (2.0, 1, 1.5, 3), (0.5, 0, 1.0, 4),
                          (1.0, 0, 1.0, 5)])
def test_beam_search_with_enough_beams_is_exhaustive(length_penalty, min_new_tokens, repetition_penalty, seed):
    max_new_tokens, batch = 4, 3
    toy = ToyDecoder(batch, seed, eos_bias=-1.0 if seed % 2 else 0.5)
    first_logits, cache = toy.initial()
    # At most 1 + 5 + 25 + 125 hypotheses end in eos, fewer than the beams: the search never stops early, and at
    # every step but the last all live sequences stay (the last step keeps the best of each length).
    out = beam_search(first_logits, cache, toy.step, TOY_EOS, TOY_PAD, num_beams=TOY_VOCAB ** 3,
                      max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                      repetition_penalty=repetition_penalty, length_penalty=length_penalty)
    check_well_formed(out, max_new_tokens, min_new_tokens, TOY_EOS, TOY_PAD)
    kinds = set()
    for b in range(batch):
        score, best = exhaustive_best(toy, b, max_new_tokens, min_new_tokens, repetition_penalty, length_penalty)
        got = strip(out[b])
        got_score = toy.log_prob(b, got, min_new_tokens, repetition_penalty) / len(got) ** length_penalty
        assert got == best, (b, got, got_score, best, score)
        assert math.isclose(got_score, score, abs_tol=1e-6)
        kinds.add(TOY_EOS in best)
    if seed == 0:
        assert kinds == {True, False}  # optima that end in eos and optima cut at the maximum


def test_beam_search_small_beams():
    """Few beams: well-formed output, no better than the optimum; one beam is the toy's greedy decoding."""
    toy = ToyDecoder(4, 7, eos_bias=0.3)
    for num_beams, min_new_tokens, max_new_tokens in [(1, 0, 5), (2, 2, 5), (3, 1, 4), (4, 0, 6), (3, 4, 4)]:
        first_logits, cache = toy.initial()
        out = beam_search(first_logits, cache, toy.step, TOY_EOS, TOY_PAD, num_beams=num_beams,
                          max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens)
        check_well_formed(out, max_new_tokens, min_new_tokens, TOY_EOS, TOY_PAD)
        if num_beams == 1:
            assert torch.equal(out, toy_greedy(toy, max_new_tokens, min_new_tokens))
        if max_new_tokens <= 5:
            for b in range(toy.batch):
                got = strip(out[b])
                score, _ = exhaustive_best(toy, b, max_new_tokens, min_new_tokens, 1.0, 1.0)
                assert toy.log_prob(b, got, min_new_tokens) / len(got) <= score + 1e-6


def toy_greedy(toy, max_new_tokens, min_new_tokens, repetition_penalty=1.0):
    rows = []
    for b in range(toy.batch):
        seq = []
        while len(seq) < max_new_tokens and (not seq or seq[-1] != TOY_EOS):
            seq.append(toy.next_probs(b, seq, min_new_tokens, repetition_penalty).argmax().item())
        rows.append(seq)
    length = max(map(len, rows))
    return torch.tensor([s + [TOY_PAD] * (length - len(s)) for s in rows])


# ------------------------------------------------------------------------------------------ repetition penalty

@pytest.mark.parametrize("penalty", [1.0, 1.3, 0.7, 2.0])
def test_repetition_penalty(penalty):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 11, generator=g) * 3
    logits[0, 4] = 0.0
    tokens = torch.randint(0, 11, (5, 7), generator=g)
    tokens[0, :3] = 4       # a zero logit, repeated
    tokens[1] = tokens[1, 0]  # one token only
    original = logits.clone()
    out = apply_repetition_penalty(logits, tokens, penalty)
    assert torch.equal(logits, original)  # not modified in place
    loop = torch.stack([penalise(logits[n], tokens[n].tolist(), penalty) for n in range(5)])
    assert torch.equal(out, loop)
    theirs = RepetitionPenaltyLogitsProcessor(penalty)(tokens, logits.clone())
    assert torch.allclose(out, theirs, atol=0, rtol=1e-6)
    assert torch.equal(apply_repetition_penalty(logits, tokens[:, :0], penalty), logits)


# ------------------------------------------------------------------------------------------- nucleus sampling

def nucleus(probs, top_p):
    """The smallest set of tokens (most probable first) whose probability reaches top_p."""
    order = probs.argsort(descending=True).tolist()
    chosen, mass = [], 0.0
    for token in order:
        chosen.append(token)
        mass += probs[token].item()
        if mass >= top_p:
            break
    return set(chosen)


def test_nucleus_tiny_top_p_is_greedy():
    toy = ToyDecoder(5, 11, eos_bias=0.5)
    for min_new_tokens, penalty in [(0, 1.0), (2, 1.4)]:
        first_logits, cache = toy.initial()
        out = nucleus_sampling(first_logits, cache, toy.step, TOY_EOS, TOY_PAD, max_new_tokens=6,
                               min_new_tokens=min_new_tokens, top_p=1e-6, repetition_penalty=penalty)
        assert torch.equal(out, toy_greedy(toy, 6, min_new_tokens, penalty))


@pytest.mark.parametrize("top_p, min_new_tokens, penalty", [(0.6, 1, 1.0), (0.9, 0, 1.3), (0.3, 2, 1.0)])
def test_nucleus_draws_within_nucleus(top_p, min_new_tokens, penalty):
    batch, max_new_tokens = 48, 6
    toy = ToyDecoder(batch, 12, eos_bias=0.5, scale=1.0)
    first_logits, cache = toy.initial()
    torch.manual_seed(0)
    out = nucleus_sampling(first_logits, cache, toy.step, TOY_EOS, TOY_PAD, max_new_tokens=max_new_tokens,
                           min_new_tokens=min_new_tokens, top_p=top_p, repetition_penalty=penalty)
    check_well_formed(out, max_new_tokens, min_new_tokens, TOY_EOS, TOY_PAD)
    sizes = []
    for b in range(batch):
        seq = strip(out[b])
        for i, token in enumerate(seq):
            allowed = nucleus(toy.next_probs(b, seq[:i], min_new_tokens, penalty), top_p)
            assert token in allowed, (b, seq, i, allowed)
            sizes.append(len(allowed))
    assert max(sizes) > 1  # the checks saw nuclei of several tokens
    assert (out == TOY_EOS).any(1).sum() >= batch // 4  # and rows that finished early, then padded


def test_nucleus_distribution():
    """The first token is drawn with the renormalised probabilities of the nucleus."""
    torch.manual_seed(0)
    logits = torch.tensor([2.0, 1.5, 1.0, 0.2, -1.0, 0.0])
    probs = logits.softmax(0)
    top_p = 0.8
    keep = sorted(nucleus(probs, top_p))
    expected = torch.zeros(6)
    expected[keep] = probs[keep] / probs[keep].sum()
    assert 2 <= len(keep) < 6
    n = 20000
    out = nucleus_sampling(logits.expand(n, -1), [], lambda *a: pytest.fail("no step after the last token"),
                           TOY_EOS, TOY_PAD, max_new_tokens=1, top_p=top_p)
    freq = torch.bincount(out[:, 0], minlength=6).float() / n
    assert torch.all((freq - expected).abs() <= 4 * (expected * (1 - expected) / n).sqrt() + 1e-9), (freq, expected)


def test_nucleus_finished_rows_emit_pad():
    """Rows that drew eos continue with pad while others go on; the search stops once every row finished."""
    toy = ToyDecoder(16, 13, eos_bias=1.5, scale=0.5)
    steps = []

    def step(tokens, cache, num_generated):
        steps.append(tokens.clone())
        return toy.step(tokens, cache, num_generated)

    first_logits, cache = toy.initial()
    torch.manual_seed(1)
    out = nucleus_sampling(first_logits, cache, step, TOY_EOS, TOY_PAD, max_new_tokens=12, top_p=0.95)
    ends = [strip(row) for row in out]
    assert len({len(e) for e in ends}) > 1
    assert all(e[-1] == TOY_EOS for e in ends)  # all finished before 12 tokens: the search stopped
    assert out.shape[1] == max(map(len, ends)) < 12
    check_well_formed(out, 12, 0, TOY_EOS, TOY_PAD)
    assert len(steps) == out.shape[1] - 1
    for t, tokens in enumerate(steps):  # the step sees exactly the tokens returned, padding included
        assert torch.equal(tokens, out[:, t])
