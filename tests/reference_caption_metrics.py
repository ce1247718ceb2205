"""Corpus BLEU-1..4 and CIDEr-D written from their papers, to check eval_caption's use of pycocoevalcap.

Captions are already tokenised: words separated by spaces. `hyps[i]` is image i's caption, `refs[i]` its list of
reference captions.

BLEU (Papineni et al. 2002), as the COCO caption toolkit applies it: n-gram matches clipped by the most times the
n-gram occurs in any one reference, summed over the corpus, divided by the corpus's hypothesis n-grams; BLEU-N is the
geometric mean of the precisions 1..N times the brevity penalty exp(1 - r / c) when c < r, where c is the total
hypothesis length and r the sum over images of the reference length closest to the hypothesis's (on a tie the
shorter). No smoothing: a zero precision makes the score 0. (pycocoevalcap adds 1e-15 to the matches and the
hypothesis length and 1e-9 to the n-gram counts and the reference length; that changes scores by about 1e-9, except
that a zero precision gives it a small positive score: see test_caption_metrics.)

CIDEr-D (Vedantam et al. 2015): for n = 1..4 each sentence is a vector of tf-idf weights of its n-grams, with
idf(g) = log(number of images) - log(max(1, number of images whose references contain g)); the similarity of a
hypothesis to one reference is the dot product of the hypothesis's weights clipped by the reference's, over both
norms, times a Gaussian penalty exp(-(length difference)^2 / (2 * 6^2)); an image scores 10 x the mean over its
references of the mean over n, the corpus the mean over images. (pycocoevalcap measures a sentence's length in
bigrams, one less than in words except for an empty sentence; the scores are the same, an empty sentence has no
n-grams to match.)
"""

import math
from collections import Counter


def ngrams(words, n):
    return Counter(zip(*(words[i:] for i in range(n))))


def bleu(hyps, refs, max_n=4):
    """[BLEU-1, ..., BLEU-max_n] of the corpus."""
    matches, totals = [0] * max_n, [0] * max_n
    hyp_length = ref_length = 0
    for hyp, image_refs in zip(hyps, refs):
        words, ref_words = hyp.split(), [r.split() for r in image_refs]
        hyp_length += len(words)
        ref_length += min((len(r) for r in ref_words), key=lambda length: (abs(length - len(words)), length))
        for n in range(1, max_n + 1):
            most_in_a_ref = Counter()
            for r in ref_words:
                most_in_a_ref |= ngrams(r, n)  # union of Counters: the larger count
            matches[n - 1] += sum((ngrams(words, n) & most_in_a_ref).values())  # intersection: the smaller count
            totals[n - 1] += max(0, len(words) - n + 1)
    precisions = [m / t if t else 0.0 for m, t in zip(matches, totals)]
    if hyp_length == 0:
        return [0.0] * max_n
    penalty = math.exp(1 - ref_length / hyp_length) if hyp_length < ref_length else 1.0
    scores = []
    for n in range(1, max_n + 1):
        product = math.prod(precisions[:n])
        scores.append(penalty * product ** (1 / n))
    return scores


def cider_d(hyps, refs, max_n=4, sigma=6.0):
    """Corpus CIDEr-D, the mean of per-image scores."""
    num_images = len(refs)
    doc_freq = Counter()
    for image_refs in refs:
        doc_freq.update({g for r in image_refs for n in range(1, max_n + 1) for g in ngrams(r.split(), n)})

    def idf(gram):
        return math.log(num_images) - math.log(max(1, doc_freq[gram]))

    def similarity(hyp_counts, ref_counts):
        """Clipped cosine of the tf-idf vectors; 0 when either is zero."""
        dot = sum(min(count, ref_counts[g]) * ref_counts[g] * idf(g) ** 2 for g, count in hyp_counts.items())
        hyp_norm = math.sqrt(sum((count * idf(g)) ** 2 for g, count in hyp_counts.items()))
        ref_norm = math.sqrt(sum((count * idf(g)) ** 2 for g, count in ref_counts.items()))
        return dot / (hyp_norm * ref_norm) if hyp_norm and ref_norm else 0.0

    image_scores = []
    for hyp, image_refs in zip(hyps, refs):
        words = hyp.split()
        per_ref = []
        for ref in image_refs:
            ref_words = ref.split()
            penalty = math.exp(-((len(words) - len(ref_words)) ** 2) / (2 * sigma ** 2))
            per_n = [similarity(ngrams(words, n), ngrams(ref_words, n)) for n in range(1, max_n + 1)]
            per_ref.append(penalty * sum(per_n) / max_n)
        image_scores.append(10.0 * sum(per_ref) / len(per_ref))
    return sum(image_scores) / len(image_scores)
