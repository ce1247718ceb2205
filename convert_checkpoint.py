"""Convert checkpoints between LAVIS's layout (this project's) and transformers' BLIP-2 layouts, and export a
stage-2 model as a transformers directory.

    python convert_checkpoint.py stage1 to_hf output/stage1/checkpoint_best.pth hf_state.pth   # + hf_state.pth.side.pth
    python convert_checkpoint.py stage1 from_hf hf_state.pth stage1.pth --side hf_state.pth.side.pth
    python convert_checkpoint.py stage2 to_hf output/stage2/checkpoint_best.pth hf_state.pth --lm facebook/opt-2.7b
    python convert_checkpoint.py stage2 from_hf hf_state.pth blip2_opt.pth
    python convert_checkpoint.py export configs/blip2_stage2.yaml output/stage2/checkpoint_best.pth hf_blip2_dir

stage1: `Blip2ForImageTextRetrieval`, which has no place for `temp` and the ITG head (they go to a side file).
stage2: `Blip2ForConditionalGeneration` or `InstructBlipForConditionalGeneration` (any LM: the projection's name in
the checkpoint, `opt_proj`, `llm_proj` or `t5_proj`, says which), whose layout includes the LM's weights.
export: the config's model with the checkpoint's weights (LoRA adapters merged) as a transformers directory
(config.json + safetensors) that `Blip2ForConditionalGeneration.from_pretrained` (InstructBLIP:
`InstructBlipForConditionalGeneration`) loads; the LM's tokenizer stays the LM's.
"""

import argparse

import torch

from models import blip2_lm
from models.blip2_qformer import from_hf_retrieval, to_hf_retrieval
from train_blip2_stage2 import Stage2Config
from utils import DTYPES, InputError, load_checkpoint_file, load_config, log, run_main

LM_LOADERS = {"opt": blip2_lm.load_causal_lm, "llm": blip2_lm.load_causal_lm, "t5": blip2_lm.load_t5}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="model", required=True)
    for name in ("stage1", "stage2"):
        command = commands.add_parser(name)
        command.add_argument("direction", choices=["to_hf", "from_hf"])
        command.add_argument("source", help="to_hf: our checkpoint (.pth); from_hf: a transformers state dict (.pth)")
        command.add_argument("output", help="the converted state dict (.pth)")
    commands.choices["stage1"].add_argument("--side", help="from_hf: the side file to_hf wrote (temp, ITG head)")
    commands.choices["stage2"].add_argument("--lm", help="to_hf: the LM (hub name or directory) it was trained with")
    export = commands.add_parser("export")
    export.add_argument("config", help="the stage-2 config the checkpoint was trained with")
    export.add_argument("checkpoint")
    export.add_argument("output_dir")
    export.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    return parser.parse_args(argv)


def convert_stage1(args, state):
    if args.direction == "to_hf":
        hf, side = to_hf_retrieval(state)
        torch.save(hf, args.output)
        torch.save(side, f"{args.output}.side.pth")
    else:
        side = load_checkpoint_file(args.side) if args.side else None
        torch.save({"model": from_hf_retrieval(state, side)}, args.output)


def convert_stage2(args, state):
    if args.direction == "to_hf":
        if not args.lm:
            raise InputError("stage2 to_hf needs --lm: transformers' layout includes the language model's weights")
        if not any(k.startswith("visual_encoder.") for k in state):
            raise InputError(f"{args.source} holds no image-encoder weights (they came from their own file in "
                             "training); transformers' layout needs them")
        lm, _ = LM_LOADERS[blip2_lm.lm_name_of(state)](args.lm, "fp32")
        torch.save(blip2_lm.to_transformers(state, lm.state_dict()), args.output)
    else:
        lavis, lm = blip2_lm.from_transformers(state, blip2_lm.lm_name_of_transformers(state))
        log(f"the language model's {len(lm)} tensors are left out: LAVIS's layout loads the LM from its own files")
        torch.save({"model": lavis}, args.output)


def export(args):
    cfg = load_config(args.config, Stage2Config)
    model, _ = blip2_lm.create_model(cfg.model)
    blip2_lm.load_checkpoint(model, args.checkpoint)
    if cfg.model.lora:
        blip2_lm.merge_lora(model)
    blip2_lm.save_transformers(model, args.output_dir, DTYPES[args.dtype])


def main(argv=None):
    args = parse_args(argv)
    if args.model == "export":
        export(args)
        print(f"wrote {args.output_dir}")
        return
    state = load_checkpoint_file(args.source)
    state = state.get("model", state)
    (convert_stage1 if args.model == "stage1" else convert_stage2)(args, state)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    run_main(main)
