"""Beam search and nucleus sampling over a key/value-cached decoder (the Q-Former's ITG head).

The decoder is given as `step(tokens [N], cache, num_generated) -> (logits [N, V], cache)`: it consumes the newest
generated tokens, `num_generated` counts the generated tokens including them, and `cache` is a list of per-layer
(keys, values) with the sequence batch first.
Both searches start from `first_logits` [B, V], the logits after the prompt, whose keys/values are in `cache`.
"""

import torch
import torch.nn.functional as F


def apply_repetition_penalty(logits, tokens, penalty):
    """CTRL's penalty (as transformers): logits of tokens already generated are divided by `penalty` when
    positive and multiplied when negative. logits [N, V], tokens [N, T]."""
    if penalty == 1.0 or tokens.shape[1] == 0:
        return logits
    seen = logits.gather(1, tokens)
    return logits.scatter(1, tokens, torch.where(seen > 0, seen / penalty, seen * penalty))


def _next_log_probs(logits, tokens, eos_id, min_new_tokens, repetition_penalty):
    logits = apply_repetition_penalty(logits, tokens, repetition_penalty)
    if tokens.shape[1] < min_new_tokens:
        logits = logits.clone()
        logits[:, eos_id] = float("-inf")
    return F.log_softmax(logits, dim=-1)


def _reorder(cache, index):
    return [(k.index_select(0, index), v.index_select(0, index)) for k, v in cache]


def _pad(sequences, pad_id, device):
    length = max(len(s) for s in sequences)
    return torch.tensor([s + [pad_id] * (length - len(s)) for s in sequences], dtype=torch.long, device=device)


def beam_search(first_logits, cache, step, eos_id, pad_id, num_beams, max_new_tokens, min_new_tokens=0,
                repetition_penalty=1.0, length_penalty=1.0):
    """The best of `num_beams` beams per input, scored by sum of log-probabilities / length ** length_penalty.

    A beam that emits eos is finished; the search for an input stops when it holds `num_beams` finished
    hypotheses that no live beam can beat (transformers' rule without early stopping). Returns [B, T] token ids
    (eos included, padded with pad_id)."""
    batch, vocab = first_logits.shape
    device, k = first_logits.device, num_beams
    beams = torch.arange(batch, device=device).repeat_interleave(k)
    cache, logits = _reorder(cache, beams), first_logits[beams]
    tokens = torch.empty(batch * k, 0, dtype=torch.long, device=device)
    scores = torch.full((batch, k), float("-inf"), device=device)
    scores[:, 0] = 0.0  # the k copies are identical: start from one so that the first step yields k distinct beams
    finished = [[] for _ in range(batch)]
    done = [False] * batch
    for t in range(max_new_tokens):
        log_probs = _next_log_probs(logits, tokens, eos_id, min_new_tokens, repetition_penalty)
        total = (scores.view(-1, 1) + log_probs).view(batch, k * vocab)
        top_scores, top_index = total.topk(2 * k, dim=1)
        next_beam, next_scores, next_tokens = [], [], []
        for b, (row_scores, row_index) in enumerate(zip(top_scores.tolist(), top_index.tolist())):
            kept = []
            for rank, (score, index) in enumerate(zip(row_scores, row_index)):
                beam, token = b * k + index // vocab, index % vocab
                if token == eos_id:
                    if rank < k and not done[b]:
                        finished[b].append((score / (t + 1) ** length_penalty, tokens[beam].tolist() + [eos_id]))
                else:
                    kept.append((score, beam, token))
                if len(kept) == k:
                    break
            finished[b] = sorted(finished[b], reverse=True)[:k]
            best_live = kept[0][0] / (t + 1) ** length_penalty
            done[b] = done[b] or (len(finished[b]) == k and finished[b][-1][0] >= best_live)
            for score, beam, token in kept:
                next_scores.append(score if not done[b] else float("-inf"))
                next_beam.append(beam)
                next_tokens.append(token)
        if all(done):
            break
        index = torch.tensor(next_beam, device=device)
        scores = torch.tensor(next_scores, device=device).view(batch, k)
        tokens = torch.cat([tokens[index], torch.tensor(next_tokens, device=device)[:, None]], 1)
        if t + 1 < max_new_tokens:
            logits, cache = step(tokens[:, -1], _reorder(cache, index), tokens.shape[1])
    for b in range(batch):
        if not done[b]:  # max_new_tokens reached: live beams compete as they are
            for j in range(k):
                if scores[b, j] > float("-inf"):
                    finished[b].append((scores[b, j].item() / tokens.shape[1] ** length_penalty,
                                        tokens[b * k + j].tolist()))
    best = [max(hyps)[1] for hyps in finished]
    return _pad(best, pad_id, device)


def nucleus_sampling(first_logits, cache, step, eos_id, pad_id, max_new_tokens, min_new_tokens=0, top_p=0.9,
                     repetition_penalty=1.0):
    """One sample per input from the smallest set of tokens whose probability reaches `top_p`; inputs that emitted
    eos continue with pad_id. Returns [B, T] token ids."""
    batch = first_logits.shape[0]
    logits = first_logits
    tokens = torch.empty(batch, 0, dtype=torch.long, device=first_logits.device)
    finished = torch.zeros(batch, dtype=torch.bool, device=first_logits.device)
    for t in range(max_new_tokens):
        probs = _next_log_probs(logits, tokens, eos_id, min_new_tokens, repetition_penalty).exp()
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # mass before this token already reaches top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        choice = order.gather(1, torch.multinomial(sorted_probs, 1)).squeeze(1)
        choice = torch.where(finished, torch.full_like(choice, pad_id), choice)
        tokens = torch.cat([tokens, choice[:, None]], 1)
        finished |= choice == eos_id
        if finished.all() or t + 1 == max_new_tokens:
            break
        logits, cache = step(choice, cache, tokens.shape[1])
    return tokens
