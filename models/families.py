"""What a state dict is: the checkpoint families this project reads, told apart by keys only each has, so that a
loader given another model's checkpoint says which one it got instead of listing mismatched keys."""

import re

from utils import InputError

# family: (what it is, a key pattern only its checkpoints have), the most specific first.
FAMILIES = {
    "hf_generation": ("a transformers BLIP-2 / InstructBLIP generation model (Blip2ForConditionalGeneration)",
                      r"language_projection\."),
    "hf_retrieval": ("a transformers BLIP-2 retrieval model (Blip2ForImageTextRetrieval)",
                     r"(vision_model|qformer)\."),
    "stage2": ("a BLIP-2 stage-2 checkpoint (opt_proj, llm_proj or t5_proj)", r"(opt|llm|t5)_proj\."),
    "stage1": ("a BLIP-2 stage-1 (Q-Former) checkpoint", r"(Qformer|query_tokens)\b"),
    "nlvr": ("a BLIP NLVR checkpoint (model_base_nlvr.pth)", r"text_encoder\..*crossattention\.self0\."),
    "blip": ("a BLIP pre-trained checkpoint (model_base.pth)",
             r"(text_decoder\.|text_encoder\..*crossattention\.self\.)"),
    "eva_vit": ("an EVA ViT-g image encoder (eva_vit_g.pth)", r"blocks\.\d+\.attn\.q_bias"),
    "clip_vit": ("a CLIP ViT-L image encoder (clip_vit_L.pth)", r"transformer\.resblocks\."),
}


def checkpoint_family(state):
    """The FAMILIES name of state dict `state` (keys with or without a `module.` prefix), or None."""
    keys = [key.removeprefix("module.") for key in state]
    return next((name for name, (_, pattern) in FAMILIES.items() if any(re.match(pattern, k) for k in keys)), None)


def describe(state):
    """`state`'s family in words (for a message that says what was given)."""
    family = checkpoint_family(state)
    if family is None:
        return f"a state dict of no model family this project reads (keys such as {', '.join(list(state)[:3])})"
    return FAMILIES[family][0]


def refuse_other_families(state, path, accepted, fix):
    """InputError unless `state` (read from `path`) is of one of the `accepted` FAMILIES; `fix` says what to give."""
    if checkpoint_family(state) not in accepted:
        raise InputError(f"{path} is {describe(state)}; {fix}")
