"""Convert checkpoints between LAVIS's layout (this project's) and transformers' BLIP-2 state-dict layouts.

    python convert_checkpoint.py stage1 to_hf output/stage1/checkpoint_best.pth hf_state.pth   # + hf_state.pth.side.pth
    python convert_checkpoint.py stage1 from_hf hf_state.pth stage1.pth --side hf_state.pth.side.pth
    python convert_checkpoint.py stage2 to_hf output/stage2/checkpoint_best.pth hf_state.pth --opt_model facebook/opt-2.7b
    python convert_checkpoint.py stage2 from_hf hf_state.pth blip2_opt.pth

stage1: `Blip2ForImageTextRetrieval`, which has no place for `temp` and the ITG head (they go to a side file).
stage2: `Blip2ForConditionalGeneration` with an OPT, whose weights transformers' layout includes.
"""

import argparse

import torch

from models.blip2_opt import from_hf_generation, load_opt, to_hf_generation
from models.blip2_qformer import from_hf_retrieval, to_hf_retrieval
from utils import InputError, load_checkpoint_file, log, run_main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=["stage1", "stage2"])
    parser.add_argument("direction", choices=["to_hf", "from_hf"])
    parser.add_argument("source", help="to_hf: our checkpoint (.pth); from_hf: a transformers state dict (.pth)")
    parser.add_argument("output", help="the converted state dict; stage1 to_hf also writes OUTPUT.side.pth")
    parser.add_argument("--side", help="stage1 from_hf: the side file written by to_hf (temp, ITG head)")
    parser.add_argument("--opt_model", help="stage2 to_hf: the OPT (hub name or directory) it was trained with")
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
        if not args.opt_model:
            raise InputError("stage2 to_hf needs --opt_model: transformers' layout includes the OPT's weights")
        if not any(k.startswith("visual_encoder.") for k in state):
            raise InputError(f"{args.source} holds no image-encoder weights (they came from their own file in "
                             "training); transformers' layout needs them")
        opt, _ = load_opt(args.opt_model, "fp32")
        torch.save(to_hf_generation(state, opt.state_dict()), args.output)
    else:
        lavis, opt = from_hf_generation(state)
        log(f"the language model's {len(opt)} tensors are left out: LAVIS's layout loads the OPT from its own files")
        torch.save({"model": lavis}, args.output)


def main(argv=None):
    args = parse_args(argv)
    state = load_checkpoint_file(args.source)
    state = state.get("model", state)
    (convert_stage1 if args.model == "stage1" else convert_stage2)(args, state)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    run_main(main)
