"""BLIP-2 stage 2: teach the Q-Former to prompt a frozen language model with images; caption, VQA and instruction
fine-tuning (InstructBLIP) with the same loop.

    python -m torch.distributed.run --nproc_per_node=8 train_blip2_stage2.py --config configs/blip2_stage2.yaml --output_dir out
    python train_blip2_stage2.py --config configs/blip2_caption_coco.yaml --output_dir out --evaluate --checkpoint blip2_caption_opt2.7b.pth

The language model is the config's (`model.arch`: blip2_opt, blip2_llm and blip2_llm_instruct for decoder-only
LMs, blip2_t5 and blip2_t5_instruct for Flan-T5); the data are (image, text_input, text_output) pairs: captions
(text_input the prompt, or with data.prefix_lm a random prefix of the caption), instruction pairs and VQA splits.
After every epoch the model is validated on data.vqa_val (VQA accuracy) when it is set, else on data.val_file
(captions scored with BLEU, METEOR, ROUGE-L, CIDEr; the best checkpoint by CIDEr + BLEU-4, as the original); the
test splits are evaluated at the end with the best weights, next to the frozen LM prompted without images (captions)
and the question-type baseline (VQA).
"""

import os
from dataclasses import dataclass, field
from functools import partial

from data.caption import CaptionDataConfig, caption_train_set, training_texts
from data.feature_cache import caption_train_loader
from data.vqa import VQAEvalConfig
from eval_caption import (CaptionEvalConfig, caption_eval_sets, caption_function, evaluate_split, evaluate_splits,
                          generation_options)
from eval_vqa import evaluate_vqa, evaluate_vqa_splits, vqa_eval_sets
from models.blip2_lm import Blip2LMConfig, create_model, load_checkpoint
from models.inference import load_for_evaluation
from models.tokenizer import check_unknown_tokens
from utils import (TrainConfig, evaluation_weights, fit, flat_metrics, log_parameters, parse_args, run_main,
                   start_run, start_training, test_best, write_evaluation)


@dataclass
class Stage2Config:
    data: CaptionDataConfig
    model: Blip2LMConfig = field(default_factory=Blip2LMConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: CaptionEvalConfig = field(default_factory=CaptionEvalConfig)
    vqa: VQAEvalConfig = field(default_factory=VQAEvalConfig)


def stage2_loss(model, batch, device):
    images, text_input, text_output, _ = batch
    return model(images.to(device, non_blocking=True), list(text_input), list(text_output))


def main(argv=None):
    args = parse_args(__doc__, argv)
    with start_run(args, Stage2Config) as run:
        cfg = run.cfg
        model, tokenizer = create_model(cfg.model)
        log_parameters(model, f"{type(model).__name__} ({cfg.model.arch}, {cfg.model.lm})")
        caption_sets, vqa_sets = caption_eval_sets(cfg, run.device), vqa_eval_sets(cfg, run.device)

        def evaluate(captions, vqa):  # {split: metrics} of caption and VQA evaluation sets, baselines included
            return {**evaluate_splits(model, tokenizer, captions, run), **evaluate_vqa_splits(model, vqa, run)}

        if args.evaluate:
            load_for_evaluation(load_checkpoint, model.to(run.device), evaluation_weights(run))
            write_evaluation(run, evaluate(caption_sets, vqa_sets))
            return

        train_set = caption_train_set(cfg.data, cfg.model.image_size, cfg.model.prompt, cfg.train.seed)
        inputs, outputs = training_texts(train_set)
        check_unknown_tokens(tokenizer, inputs + outputs, cfg.data.allow_unknown_tokens)  # skipped for byte-level BPE
        if model.qformer_text_input:
            check_unknown_tokens(model.qformer_tokenizer, inputs, cfg.data.allow_unknown_tokens)
        state = start_training(run, model, load_checkpoint)
        loader = caption_train_loader(state, train_set)
        caption_fn = caption_function(model, tokenizer, generation_options(cfg.eval), run)

        def validate(at):
            model.eval()
            if "vqa_val" in vqa_sets:
                path = os.path.join(run.output_dir, f"vqa_val_{at.replace(' ', '_')}_results.json")
                return {f"vqa_val_{k}": v for k, v in evaluate_vqa(model, vqa_sets["vqa_val"], run, f"VQA val {at}",
                                                                   path).items()}
            val_loader, ground_truth = caption_sets["val"]
            path = os.path.join(run.output_dir, f"val_{at.replace(' ', '_')}_captions.json")
            return {f"val_{k}": v for k, v in evaluate_split(caption_fn, val_loader, ground_truth, f"Val {at}",
                                                             path).items()}

        fit(state, loader, partial(stage2_loss, device=run.device), validate,
            "vqa_val_accuracy" if "vqa_val" in vqa_sets else "val_agg_metric")
        tests = ({k: v for k, v in caption_sets.items() if k == "test"}, {k: v for k, v in vqa_sets.items()
                                                                         if k == "vqa_test"})
        if any(tests):
            test_best(state, lambda: flat_metrics(evaluate(*tests)))


if __name__ == "__main__":
    run_main(main)
