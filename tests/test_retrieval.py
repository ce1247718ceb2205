"""eval_retrieval: recall metrics against brute force, the ITC / ITM re-ranking protocol against pair-by-pair
recomputation with a tiny random Blip2Qformer, and one process against two (torchrun, gloo)."""

import json

import numpy as np
import pytest
import torch

import eval_retrieval
from eval_retrieval import candidate_metrics
from models.tokenizer import init_tokenizer
from tests.conftest import run_script
from tests.retrieval_ddp import build_dataset, build_model, evaluate

TORCHRUN = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
KEYS = ("txt_r1", "txt_r5", "txt_r10", "txt_r_mean", "img_r1", "img_r5", "img_r10", "img_r_mean", "r_mean")
MAX_LENGTH = 35  # evaluate_retrieval's default


# ------------------------------------------------------------------------------------------------- brute force

def retrieval_metrics(scores_i2t, scores_t2i, txt2img):
    """candidate_metrics with every text and every image a candidate: dense [I, T] and [T, I] scores."""
    scores_i2t, scores_t2i = torch.as_tensor(scores_i2t), torch.as_tensor(scores_t2i)
    return candidate_metrics(torch.arange(scores_i2t.shape[1]).expand_as(scores_i2t), scores_i2t,
                             torch.arange(scores_t2i.shape[1]).expand_as(scores_t2i), scores_t2i, txt2img)


def brute_rank(row, targets):
    """Position of the best-placed target when `row` is sorted by descending score: the number of entries that
    score strictly higher than it. A target scored -inf (left out of the re-ranking) is never found: it counts as
    placed after every entry."""
    positions = [sum(1 for s in row if s > row[g]) for g in targets if row[g] > -np.inf]
    return min(positions, default=len(row))


def brute_metrics(scores_i2t, scores_t2i, img2txt, txt2img):
    scores_i2t, scores_t2i = np.asarray(scores_i2t, dtype=np.float64), np.asarray(scores_t2i, dtype=np.float64)
    text_ranks = [brute_rank(scores_i2t[i], img2txt[i]) for i in range(len(img2txt))]
    image_ranks = [brute_rank(scores_t2i[t], [txt2img[t]]) for t in range(len(txt2img))]
    out = {}
    for name, ranks in (("txt", text_ranks), ("img", image_ranks)):
        for k in (1, 5, 10):
            out[f"{name}_r{k}"] = 100.0 * sum(r < k for r in ranks) / len(ranks)
        out[f"{name}_r_mean"] = (out[f"{name}_r1"] + out[f"{name}_r5"] + out[f"{name}_r10"]) / 3
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out


def assert_metrics_equal(actual, expected, atol=1e-4):
    assert set(actual) == set(KEYS), sorted(actual)
    for key in KEYS:
        assert actual[key] == pytest.approx(expected[key], abs=atol), (key, actual, expected)


# ---------------------------------------------------------------------------------------------- metrics alone

def random_case(rng, num_images, max_captions):
    counts = rng.integers(1, max_captions + 1, size=num_images)
    img2txt, txt2img = [], []
    for image, count in enumerate(counts):
        img2txt.append(list(range(len(txt2img), len(txt2img) + count)))
        txt2img += [image] * count
    # Continuous scores (no ties), nudged towards the ground truth so that every recall is somewhere in (0, 100).
    positive = np.zeros((num_images, len(txt2img)))
    for image, texts in enumerate(img2txt):
        positive[image, texts] = 1.0
    scores_i2t = rng.normal(size=positive.shape) + 1.5 * positive
    scores_t2i = rng.normal(size=positive.T.shape) + 1.5 * positive.T
    return scores_i2t, scores_t2i, img2txt, txt2img


@pytest.mark.parametrize("seed", range(6))
def test_retrieval_metrics_match_brute_force_on_random_scores(seed):
    rng = np.random.default_rng(seed)
    num_images = int(rng.integers(12, 30))
    scores_i2t, scores_t2i, img2txt, txt2img = random_case(rng, num_images, max_captions=5)
    expected = brute_metrics(scores_i2t, scores_t2i, img2txt, txt2img)
    assert any(0 < expected[k] < 100 for k in ("txt_r1", "txt_r5", "txt_r10")), expected
    assert any(0 < expected[k] < 100 for k in ("img_r1", "img_r5", "img_r10")), expected
    for dtype in (torch.float32, torch.float64):
        actual = retrieval_metrics(torch.tensor(scores_i2t, dtype=dtype), torch.tensor(scores_t2i, dtype=dtype),
                                   txt2img)
        assert_metrics_equal(actual, expected)
    assert_metrics_equal(retrieval_metrics(scores_i2t, scores_t2i, txt2img), expected)  # NumPy input


def _scores_from_orders(orders):
    """Score rows in which entry orders[r][0] scores highest, orders[r][1] next, and so on."""
    rows = np.zeros((len(orders), len(orders[0])))
    for r, order in enumerate(orders):
        assert sorted(order) == list(range(len(order)))
        rows[r, order] = np.linspace(1.0, -1.0, len(order))
    return rows


def test_retrieval_metrics_hand_checked_case():
    # 3 images, 12 texts: image 0 has texts 0-1, image 1 has text 2, image 2 has texts 3-11.
    img2txt = [[0, 1], [2], list(range(3, 12))]
    txt2img = [0, 0, 1] + [2] * 9
    scores_i2t = _scores_from_orders([
        [1, 5, 0, 2, 3, 4, 6, 7, 8, 9, 10, 11],  # image 0: its text 1 first          -> rank 0
        [0, 1, 3, 4, 5, 6, 7, 8, 9, 10, 2, 11],  # image 1: its only text 11th        -> rank 10
        [0, 2, 7, 1, 3, 4, 5, 6, 8, 9, 10, 11],  # image 2: its best text (7) third   -> rank 2
    ])
    # Texts 0-5 find their image first; texts 6-8 second, texts 9-11 last (rank 2).
    t2i_orders = []
    for t, image in enumerate(txt2img):
        others = [j for j in range(3) if j != image]
        t2i_orders.append([image] + others if t < 6 else [others[0], image, others[1]] if t < 9 else others + [image])
    scores_t2i = _scores_from_orders(t2i_orders)
    # A transposed i2t matrix would give other image ranks: the t2i metrics must come from scores_t2i.
    assert brute_metrics(scores_i2t, scores_i2t.T, img2txt, txt2img)["img_r1"] != 50.0

    metrics = retrieval_metrics(torch.tensor(scores_i2t), torch.tensor(scores_t2i), txt2img)
    expected = {"txt_r1": 100 / 3, "txt_r5": 200 / 3, "txt_r10": 200 / 3, "img_r1": 50.0, "img_r5": 100.0,
                "img_r10": 100.0}
    expected["txt_r_mean"] = (100 / 3 + 400 / 3) / 3
    expected["img_r_mean"] = 250 / 3
    expected["r_mean"] = (expected["txt_r_mean"] + expected["img_r_mean"]) / 2
    assert_metrics_equal(metrics, expected)  # float32 means: about 1e-6 off
    assert_metrics_equal(brute_metrics(scores_i2t, scores_t2i, img2txt, txt2img), expected, atol=1e-9)

    # Perfect and hopeless rankings.
    perfect_i2t = np.zeros((3, 12))
    for image, texts in enumerate(img2txt):
        perfect_i2t[image, texts] = 1.0 + np.arange(len(texts)) * 1e-3
    perfect_t2i = np.eye(3)[txt2img] + np.arange(3)[None, :] * 1e-3
    perfect = retrieval_metrics(perfect_i2t, perfect_t2i, txt2img)
    assert all(perfect[k] == pytest.approx(100.0) for k in KEYS), perfect


# ------------------------------------------------------------------------------------- the model's protocol

def score_margin(scores, img2txt, txt2img, k=None):
    """The smallest score difference that decides a recall (best ground truth against any other entry of its
    row, in both directions) or, with `k`, a row's top-k set (k-th against (k+1)-th best)."""
    margin = float("inf")
    for rows, targets in ((scores, img2txt), (scores.t(), [[image] for image in txt2img])):
        for row, gts in zip(rows, targets):
            best = max(gts, key=lambda c: float(row[c]))
            others = torch.cat([row[:best], row[best + 1:]])
            margin = min(margin, float((others - row[best]).abs().min()))
            if k is not None:
                ordered = row.sort(descending=True).values
                margin = min(margin, float(ordered[k - 1] - ordered[k]))
    return margin


@pytest.fixture(scope="module")
def setup(demo_data):
    """Tiny seeded model, the synthetic val split (8 images, 5 captions each) and pair-by-pair brute-force ITC
    similarities and ITM scores of all pairs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 cores, maybe shared: OpenMP threads that wait on each other are many times slower
    tokenizer = init_tokenizer(str(demo_data / "tokenizer"), enc_token=False)
    model = build_model(tokenizer)
    dataset = build_dataset(demo_data, demo_data / "coco_karpathy_val.json")
    num_images, num_texts = len(dataset), len(dataset.text)
    assert num_images == 8 and num_texts == 40

    with torch.no_grad():
        image_embeds = [model.image_embeddings(dataset[i][0][None]) for i in range(num_images)]  # [1, N, Dv]
        image_feats = [model.image_features(e)[0] for e in image_embeds]  # [Q, E]
        # Each text alone, unpadded: the batched, padded encoding must not depend on padding.
        tokens = [tokenizer(text, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
                  for text in dataset.text]
        text_feats = [model.text_features(t.input_ids, t.attention_mask)[0] for t in tokens]  # [E]
        itc = torch.zeros(num_images, num_texts, dtype=torch.float64)
        itm = torch.zeros(num_images, num_texts, dtype=torch.float64)
        for i in range(num_images):
            for t in range(num_texts):
                itc[i, t] = max(float(torch.dot(query, text_feats[t])) for query in image_feats[i])
                itm[i, t] = float(model.itm_scores(image_embeds[i], tokens[t].input_ids,
                                                   tokens[t].attention_mask)[0])
    # Continuous scores: the comparisons that decide the recalls and the top-k sets are far beyond float error.
    for scores in (itc, itm, itm + itc):
        assert score_margin(scores, dataset.img2txt, dataset.txt2img, k=3) > 1e-5, "near ties; change the seed"
    yield {"model": model, "tokenizer": tokenizer, "dataset": dataset, "itc": itc, "itm": itm}
    torch.set_num_threads(threads)


def test_itc_scores_match_pair_by_pair_similarity(setup):
    dataset, itc = setup["dataset"], setup["itc"]
    metrics, scores = evaluate(setup["model"], dataset, setup["tokenizer"], torch.device("cpu"), "itc", k_test=3)
    # Only the 10 best of each row are kept (R@10 needs no more), with their pair-by-pair similarity.
    for name, sim in (("i2t", itc), ("t2i", itc.t())):
        chosen = torch.isfinite(scores[name])
        top = sim.topk(min(10, sim.shape[1]), dim=1).indices
        assert torch.equal(chosen, torch.zeros_like(chosen).scatter_(1, top, True)), name
        torch.testing.assert_close(scores[name][chosen].double(), sim[chosen], atol=1e-5, rtol=0)
    expected = brute_metrics(itc.numpy(), itc.t().numpy(), dataset.img2txt, dataset.txt2img)
    assert_metrics_equal(metrics, expected)
    # The metrics say something: not all perfect, not all zero.
    assert 0 < metrics["r_mean"] < 100


@pytest.mark.parametrize("score, keyed_images", [("itm+itc", 32), ("itm", 32), ("itm+itc", 3)])
def test_reranking_every_pair_matches_pair_by_pair_itm(setup, score, keyed_images, monkeypatch):
    """Also with the images' keys and values held for 3 images at a time (the 8 images in 3 groups)."""
    monkeypatch.setattr(eval_retrieval, "KEYED_IMAGES", keyed_images)
    dataset, itc, itm = setup["dataset"], setup["itc"], setup["itm"]
    num_texts = len(dataset.text)
    metrics, scores = evaluate(setup["model"], dataset, setup["tokenizer"], torch.device("cpu"), score,
                               k_test=num_texts)
    total = itm + itc if score == "itm+itc" else itm
    torch.testing.assert_close(scores["i2t"].double(), total, atol=1e-4, rtol=0)
    torch.testing.assert_close(scores["t2i"].double(), total.t(), atol=1e-4, rtol=0)
    expected = brute_metrics(total.numpy(), total.t().numpy(), dataset.img2txt, dataset.txt2img)
    assert_metrics_equal(metrics, expected)
    # Re-ranking changes the order (otherwise the comparison could not tell ITM from ITC).
    assert not torch.equal(total.argsort(dim=1), itc.argsort(dim=1))


def test_reranking_only_the_top_k_itc_candidates(setup):
    dataset, itc, itm = setup["dataset"], setup["itc"], setup["itm"]
    k = 3
    metrics, scores = evaluate(setup["model"], dataset, setup["tokenizer"], torch.device("cpu"), "itm+itc",
                               k_test=k)
    # The protocol, pair by pair: ITM + ITC for each row's k best ITC candidates, -inf for the rest.
    expected = {}
    for name, sim, re_ranked in (("i2t", itc, itm + itc), ("t2i", itc.t(), (itm + itc).t())):
        protocol = torch.full_like(sim, float("-inf"))
        for r in range(sim.shape[0]):
            ranked = sorted(range(sim.shape[1]), key=lambda c: -float(sim[r, c]))
            for c in ranked[:k]:
                protocol[r, c] = re_ranked[r, c]
        expected[name] = protocol

        actual = scores[name].double()
        chosen = torch.isfinite(actual)
        assert torch.equal(chosen, torch.isfinite(protocol)), name
        assert (chosen.sum(1) == k).all(), name
        torch.testing.assert_close(actual[chosen], protocol[chosen], atol=1e-4, rtol=0)
        # Outside the top k nothing outranks a candidate.
        for r in range(actual.shape[0]):
            assert actual[r][~chosen[r]].max() < actual[r][chosen[r]].min(), (name, r)
        # The re-ranked order within the top k differs from ITC's somewhere (else ITM would be untested here).
        assert not torch.equal(protocol.argsort(dim=1, stable=True), sim.masked_fill(
            ~chosen, float("-inf")).argsort(dim=1, stable=True)), name
    assert_metrics_equal(metrics, brute_metrics(expected["i2t"].numpy(), expected["t2i"].numpy(), dataset.img2txt,
                                                dataset.txt2img))


# ------------------------------------------------------------------------------------- one vs two processes

def test_two_processes_give_the_metrics_of_one(setup, demo_data, tmp_path):
    # 7 images over 2 ranks (4 + 3) and 35 texts (18 + 17): unequal shards.
    entries = json.loads((demo_data / "coco_karpathy_val.json").read_text())[:7]
    ann_file = tmp_path / "val7.json"
    ann_file.write_text(json.dumps(entries))
    out = tmp_path / "two.json"
    run_script(*TORCHRUN, "tests/retrieval_ddp.py", "--data", demo_data, "--ann_file", ann_file,
               "--score", "itm+itc", "--k_test", 3, "--out", out, env={"OMP_NUM_THREADS": "1"}, timeout=300)
    two_metrics = json.loads(out.read_text())
    two_scores = torch.load(f"{out}.pt", weights_only=True)

    assert score_margin(setup["itc"][:7, :35], img2txt=[list(range(5 * i, 5 * i + 5)) for i in range(7)],
                        txt2img=[t // 5 for t in range(35)], k=3) > 1e-5
    one_metrics, one_scores = evaluate(setup["model"], build_dataset(demo_data, ann_file), setup["tokenizer"],
                                       torch.device("cpu"), "itm+itc", k_test=3)
    assert one_scores["i2t"].shape == (7, 35)
    for name in ("i2t", "t2i"):
        assert torch.equal(torch.isfinite(two_scores[name]), torch.isfinite(one_scores[name])), name
        torch.testing.assert_close(two_scores[name], one_scores[name], atol=1e-5, rtol=0)
    assert set(two_metrics) == set(one_metrics)
    for key in one_metrics:
        np.testing.assert_allclose(two_metrics[key], one_metrics[key], atol=1e-4, err_msg=key)
