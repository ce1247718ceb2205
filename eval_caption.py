"""Image captioning evaluation with the protocol of the original: generate one caption per image, then score it
against the image's reference captions with the COCO caption metrics of pycocoevalcap (BLEU-1..4, METEOR, ROUGE-L,
CIDEr-D, and SPICE where its models are installed), after pycocoevalcap's PTB tokenisation.

    python -m torch.distributed.run --nproc_per_node=8 eval_caption.py --config configs/blip2_caption_coco.yaml --output_dir out --checkpoint blip2_caption_opt2.7b.pth
    python eval_caption.py --config configs/blip2_stage2_demo.yaml --output_dir out --checkpoint output/blip2_stage2_demo/checkpoint_best.pth

The model is a stage-2 model (`model.arch: blip2_opt`, `blip2_llm`, `blip2_t5`, `blip2_*_instruct`: any stage-2
training config) or the ITG decoder of a stage-1 Q-Former (`model.arch: blip2_qformer`, with an `eval:` section of
captioning options, as in configs/blip2_qformer_caption_demo.yaml). Captions of data.val_file and data.test_file go to
output_dir/<split>_captions.json ([{"image_id", "caption"}]), the metrics to a printed table and
output_dir/evaluate.txt (JSON). Ground truth comes from data.val_gt_file / data.test_gt_file (COCO format, such as
coco_karpathy_test_gt.json), else from the annotation file's own captions.

Java runs the tokeniser, METEOR and SPICE. Without Java the captions are tokenised by a Python approximation and only
BLEU, ROUGE-L and CIDEr are reported. SPICE also needs Stanford CoreNLP 3.6.0 in pycocoevalcap/spice/lib, which
pycocoevalcap downloads on first use (`python -m pycocoevalcap.spice.get_stanford_models`); offline it is skipped.
"""

import json
import os
import re
import shutil
from dataclasses import dataclass, field

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.spice import spice
from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS, PTBTokenizer

from data.caption import CaptionDataConfig, _parse_eval_entry, _unique_image_ids, eval_sets
from data.loader import eval_loader
from data.utils import read_annotation, read_json
from data.vqa import VQAEvalConfig
from models.blip2_lm import Blip2LM, Blip2LMConfig
from models.blip2_qformer import Blip2QformerConfig, decode_captions
from models.inference import evaluation_model
from utils import (Count, InputError, PositiveFloat, TrainConfig, Workers, broadcast_from_main, check_new_tokens,
                   generate_texts, is_main_process, log, parse_args, run_main, start_run, write_evaluation)

BLEU = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4")
SPICE_MODELS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
# The approximation of PTBTokenizer (approximate_ptb): clitics to split off, then the tokens.
CLITIC = re.compile(r"(\w)(n't|'(?:s|re|ve|ll|d|m))\b")
PTB_TOKEN = re.compile(r"n't|'(?:s|re|ve|ll|d|m)\b|(?:[a-z]\.){2,}|\d+(?::\d+)+|\w+(?:[.,\-'&/]\w+)*"
                       r"|\.\.\.|--|[?!]+|\S")
# PTBTokenizer -lowerCase turns brackets into these tokens, and pycocoevalcap (which removes "-LRB-", upper case)
# keeps them: the approximation does the same so that its scores stay close to the Java path's.
BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}


@dataclass
class CaptionEvalConfig:
    """The `eval:` section of stage-2 and captioning configs."""
    batch_size: Count = 64                    # images per generate call
    num_beams: Count = 5
    max_new_tokens: Count = 30
    min_new_tokens: Workers = 8
    repetition_penalty: PositiveFloat = 1.0
    length_penalty: float = 1.0
    text_only_baseline: bool = True           # stage-2 models: also score the frozen LM prompted without images

    def validate(self):
        return check_new_tokens(self)


@dataclass
class CaptionConfig:
    """A stage-2 config, or a stage-1 one whose `eval:` section holds captioning options."""
    data: CaptionDataConfig
    model: Blip2LMConfig | Blip2QformerConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: CaptionEvalConfig = field(default_factory=CaptionEvalConfig)
    vqa: VQAEvalConfig = field(default_factory=VQAEvalConfig)  # stage-2 configs' VQA options (eval_vqa.py)


# ------------------------------------------------------------------------------------------------ generation

def generation_options(e):
    """The keyword arguments of Blip2LM.caption and Blip2Qformer.generate from a CaptionEvalConfig."""
    return dict(num_beams=e.num_beams, max_new_tokens=e.max_new_tokens, min_new_tokens=e.min_new_tokens,
                repetition_penalty=e.repetition_penalty, length_penalty=e.length_penalty)


def caption_function(model, tokenizer, options, run):
    """caption_fn(images) -> strings for generate_captions: a stage-2 model's captions (its prompt not included), or
    the ITG decoder's of a Blip2Qformer decoded by its `tokenizer`; on the run's device, under its autocast."""
    def caption_fn(images):
        images = images.to(run.device, non_blocking=True)
        with run.autocast():
            if isinstance(model, Blip2LM):
                return model.caption(images, **options)
            return decode_captions(tokenizer, model.generate(images, **options))
    return caption_fn


def generate_captions(caption_fn, loader, header="Captioning"):
    """[{"image_id", "caption"}] for every image of `loader.dataset` (a data.caption.RetrievalDataset whose loader
    shards the images over ranks), in the dataset's order, on every rank. `caption_fn(images)` gets a batch of
    images as loaded (on CPU) and returns one string per image."""
    captions = generate_texts(lambda images, index: caption_fn(images), loader, header)
    return [{"image_id": image_id, "caption": caption} for image_id, caption in zip(loader.dataset.image_ids, captions)]


# ------------------------------------------------------------------------------------------------ ground truth

def ground_truth_from_coco(path):
    """{image_id: [captions]} from a COCO caption ground-truth file ({"annotations": [{"image_id", "caption"}]},
    such as coco_karpathy_val_gt.json)."""
    data = read_json(path, "caption ground-truth file")
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise InputError(f"{path}: expected COCO caption ground truth, an object whose 'annotations' list holds "
                         "{'image_id', 'caption'} objects (such as coco_karpathy_val_gt.json)")
    ground_truth = {}
    for i, ann in enumerate(data["annotations"]):
        where = f"{path}: annotations[{i}]"
        for name in ("image_id", "caption"):
            if not isinstance(ann, dict) or name not in ann:
                raise InputError(f"{where}: missing field '{name}'; every annotation needs 'image_id' and 'caption'")
        if isinstance(ann["image_id"], bool) or not isinstance(ann["image_id"], (int, str)):
            raise InputError(f"{where}: 'image_id' must be an integer or a string; got {ann['image_id']!r:.80}")
        if not isinstance(ann["caption"], str):
            raise InputError(f"{where}: 'caption' must be a string; got {ann['caption']!r:.80}")
        ground_truth.setdefault(ann["image_id"], []).append(ann["caption"])
    if not ground_truth:
        raise InputError(f"{path} has no annotations")
    return ground_truth


def ground_truth_from_annotation(path):
    """{image_id: [captions]} from a Karpathy-format evaluation file ([{"image", "caption": [...]}]) itself, keyed
    by the ids that data.caption.RetrievalDataset gives its images; captions raw (the metrics tokenise them)."""
    entries = [_parse_eval_entry(entry, f"{path}[{i}]") for i, entry in enumerate(read_annotation(path))]
    if not entries:
        raise InputError(f"{path} has no examples")
    return dict(zip(_unique_image_ids(entries, path), (entry["caption"] for entry in entries)))


# ----------------------------------------------------------------------------------------------------- metrics

def caption_metrics(results, ground_truth):
    """COCO caption metrics of `results` {image_id: caption} against `ground_truth` {image_id: [captions]}, which
    must cover the same images: {"Bleu_1".."Bleu_4", "METEOR", "ROUGE_L", "CIDEr"[, "SPICE"]} as floats (fractions,
    not percent). CIDEr's idf comes from the evaluated images' references, as in the original."""
    check_same_images(results, ground_truth)
    # pycocoevalcap needs keys that compare and sort alike (SPICE sorts them): positions, not the mixed ids.
    order = list(ground_truth)
    refs = {k: ground_truth[image_id] for k, image_id in enumerate(order)}
    hyps = {k: [results[image_id]] for k, image_id in enumerate(order)}
    java = shutil.which("java") is not None
    if not java:
        log("caption metrics: no java on PATH, so tokenising with a Python approximation of PTBTokenizer and "
            "leaving out METEOR and SPICE; install a Java runtime for the full COCO caption metrics")
    refs, hyps = _tokenize(refs, hyps, java)
    metrics = dict(zip(BLEU, Bleu(4).compute_score(refs, hyps, verbose=0)[0]))  # verbose=0: no printed counts
    if java:
        metrics["METEOR"] = Meteor().compute_score(refs, hyps)[0]
    metrics["ROUGE_L"] = Rouge().compute_score(refs, hyps)[0]
    metrics["CIDEr"] = Cider().compute_score(refs, hyps)[0]
    if java and _spice_models_present():
        metrics["SPICE"] = spice.Spice().compute_score(refs, hyps)[0]
    return {name: float(value) for name, value in metrics.items()}


def agg_metric(metrics):
    """The original's criterion for keeping the best checkpoint: CIDEr + BLEU-4."""
    return metrics["CIDEr"] + metrics["Bleu_4"]


def check_same_images(results, ground_truth):
    """InputError unless `results` and `ground_truth` have the same (non-empty) set of image ids."""
    if not ground_truth:
        raise InputError("caption metrics of no images: the ground truth is empty")
    no_truth = [image_id for image_id in results if image_id not in ground_truth]
    no_result = [image_id for image_id in ground_truth if image_id not in results]
    if no_truth or no_result:
        raise InputError(f"caption results and ground truth differ: {len(no_truth)} captioned images have no ground "
                         f"truth {no_truth[:5]}, {len(no_result)} ground-truth images have no caption "
                         f"{no_result[:5]}. The ground truth must be of the evaluated split, keyed by the ids "
                         "RetrievalDataset.image_ids gives (an integer and a string are different ids)")


def _spice_models_present():
    """Whether SPICE can run offline: pycocoevalcap's Spice() downloads Stanford CoreNLP when it is missing."""
    lib = os.path.join(os.path.dirname(os.path.abspath(spice.__file__)), "lib")
    missing = [name for name in SPICE_MODELS if not os.path.isfile(os.path.join(lib, name))]
    if missing:
        log(f"caption metrics: SPICE skipped, {' and '.join(missing)} not in {lib}; to enable it run "
            "`python -m pycocoevalcap.spice.get_stanford_models` once with internet access")
    return not missing


def _tokenize(refs, hyps, java):
    """(refs, hyps) with every caption PTB-tokenised, lower-cased and stripped of punctuation."""
    # Line breaks inside a caption (also \r, \u2028, ...) would shift every later caption in the Java tokeniser's
    # line-by-line output onto the wrong image: whitespace runs become one space first.
    groups = {(name, k): [" ".join(c.split()) for c in captions]
              for name, part in (("ref", refs), ("hyp", hyps)) for k, captions in part.items()}
    if java:
        # One tokeniser run for both sets: each run starts a JVM.
        tokens = PTBTokenizer().tokenize({key: [{"caption": c} for c in captions] for key, captions in groups.items()})
    else:
        tokens = {key: [approximate_ptb(c) for c in captions] for key, captions in groups.items()}
    return {k: tokens[("ref", k)] for k in refs}, {k: tokens[("hyp", k)] for k in hyps}


def approximate_ptb(caption):
    """pycocoevalcap's tokenisation (Stanford PTBTokenizer, lower case, punctuation tokens removed) in Python, for
    machines without Java: splits off punctuation and the clitics 's n't 're 've 'll 'd 'm, keeps a word's inner
    . , - ' & / (3.5, black-and-white), times (5:30), abbreviations (p.m.) and runs of ! and ? ("?!", which
    pycocoevalcap keeps), drops quotes."""
    text = CLITIC.sub(r"\1 \2", caption.lower())
    tokens = PTB_TOKEN.findall(text)
    return " ".join(BRACKETS.get(t, t) for t in tokens if t not in PUNCTUATIONS and t != '"')


def text_only_baseline(model, ground_truth, options):
    """Caption metrics of a stage-2 model's frozen LM prompted without images: the same caption (the prompt, beam
    search) for every image; what the soft prompt adds is the difference to the model's scores."""
    caption = model.caption(None, **options)[0]
    log(f"text-only caption: {caption!r}")
    return broadcast_from_main(lambda: caption_metrics({image_id: caption for image_id in ground_truth}, ground_truth))


# ---------------------------------------------------------------------------------------------------- together

def evaluate_captions(caption_fn, loader, ground_truth, header="Captioning", results_path=None):
    """generate_captions, then caption_metrics against `ground_truth` on the main process, on every rank; with
    `results_path` the captions are written there (main process) as JSON [{"image_id", "caption"}].
    Returns (metrics, results)."""
    results = generate_captions(caption_fn, loader, header)
    by_id = {r["image_id"]: r["caption"] for r in results}
    check_same_images(by_id, ground_truth)  # on every rank: an error on rank 0 alone would leave the others waiting
    if results_path and is_main_process():
        with open(results_path, "w") as f:
            json.dump(results, f)
    return broadcast_from_main(lambda: caption_metrics(by_id, ground_truth)), results


def caption_eval_sets(cfg, device):
    """{split: (loader, ground truth)} of data.val_file and data.test_file of a stage-2 or captioning config."""
    gt_files = {"val": cfg.data.val_gt_file, "test": cfg.data.test_gt_file}
    ann_files = {"val": cfg.data.val_file, "test": cfg.data.test_file}
    return {split: (eval_loader(dataset, cfg.eval.batch_size, **cfg.data.loader_kwargs(device)),
                    ground_truth_from_coco(gt_files[split]) if gt_files[split]
                    else ground_truth_from_annotation(ann_files[split]))
            for split, dataset in eval_sets(cfg.data, cfg.model.image_size).items()}


def evaluate_split(caption_fn, loader, ground_truth, header, results_path):
    """evaluate_captions' metrics plus the original's best-checkpoint criterion `agg_metric` (CIDEr + BLEU-4)."""
    metrics, _ = evaluate_captions(caption_fn, loader, ground_truth, header, results_path)
    return {**metrics, "agg_metric": agg_metric(metrics)}


def evaluate_splits(model, tokenizer, sets, run):
    """{split: metrics} of `model` in eval mode for `sets` (caption_eval_sets), captions written to
    output_dir/<split>_captions.json; with a stage-2 model and eval.text_only_baseline also "test_text_only", the
    frozen LM's scores without images."""
    model.eval()
    options = generation_options(run.cfg.eval)
    caption_fn = caption_function(model, tokenizer, options, run)
    results = {split: evaluate_split(caption_fn, loader, truth, split,
                                     os.path.join(run.output_dir, f"{split}_captions.json"))
               for split, (loader, truth) in sets.items()}
    if "test" in sets and isinstance(model, Blip2LM) and run.cfg.eval.text_only_baseline:
        results["test_text_only"] = text_only_baseline(model, sets["test"][1], options)
    return results


def main(argv=None):
    args = parse_args(__doc__, argv, training=False)
    with start_run(args, CaptionConfig) as run:
        sets = caption_eval_sets(run.cfg, run.device)
        if not sets:
            raise InputError(f"{args.config}: nothing to evaluate; set data.val_file and/or data.test_file")
        model, tokenizer = evaluation_model(run, unused=("temp",))  # captioning needs no ITC temperature
        write_evaluation(run, evaluate_splits(model, tokenizer, sets, run))


if __name__ == "__main__":
    run_main(main)
