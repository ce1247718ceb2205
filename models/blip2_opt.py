"""BLIP-2 stage 2: the Q-Former's query outputs as a soft prompt of a frozen OPT language model (LAVIS `blip2_opt`).

    images [B, 3, S, S] -> frozen image encoder -> ln_vision [B, N, Dv] -> Q-Former queries [B, Q, H]
    -> opt_proj [B, Q, D] -> followed by the embedded `prompt caption\\n` [B, L, D] -> OPT -> next-token loss on the
    caption and its "\\n" (queries, prompt and padding carry no loss).

State-dict keys are LAVIS's (`blip2_pretrained_opt2.7b.pth`): `visual_encoder.*`, `ln_vision.*`, `query_tokens`,
`Qformer.bert.*` (no word/position embeddings, no text FFN, no LM head) and `opt_proj.*`. The OPT is a transformers
`OPTForCausalLM` loaded by hub name or directory; its weights never enter a checkpoint of this model.
`to_hf_generation`/`from_hf_generation` convert to and from transformers' `Blip2ForConditionalGeneration` layout.
"""

import re
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AutoTokenizer, OPTForCausalLM

from models.blip2_qformer import hf_to_lavis, lavis_to_hf
from models.eva_vit import VisionConfig, create_vision_encoder, freeze_vision_encoder, load_vision_file, load_vision_weights
from models.qformer import build_qformer
from utils import DTYPES, InputError, all_reduce_sum, get_world_size, load_checkpoint_file, log

CHECKPOINT_URLS = {
    "pretrain_opt2.7b": "https://storage.googleapis.com/sfr-vision-language-research/LAVIS/models/BLIP2/"
                        "blip2_pretrained_opt2.7b.pth",
    "pretrain_opt6.7b": "https://storage.googleapis.com/sfr-vision-language-research/LAVIS/models/BLIP2/"
                        "blip2_pretrained_opt6.7b.pth",
    "caption_coco_opt2.7b": "https://storage.googleapis.com/sfr-vision-language-research/LAVIS/models/BLIP2/"
                            "blip2_caption_opt2.7b.pth",
}
# What a stage-1 checkpoint holds and the stage-2 model has not: the Q-Former's text side and the stage-1 heads.
STAGE1_ONLY = re.compile(r"Qformer\.cls\.|Qformer\.bert\.embeddings\.(word|position)_embeddings\.|"
                         r"Qformer\.bert\.encoder\.layer\.\d+\.(intermediate|output)\.|vision_proj\.|text_proj\.|"
                         r"itm_head\.|temp$")


@dataclass
class Blip2OPTConfig(VisionConfig):
    """The `model:` section of a stage-2 config."""
    arch: Literal["blip2_opt"] = "blip2_opt"
    qformer: Literal["tiny", "base"] = "base"
    num_query_tokens: int = 32
    cross_attention_freq: int = 2
    opt_model: str = "facebook/opt-2.7b"      # hub name or local directory (model and tokenizer)
    opt_precision: Literal["fp16", "bf16", "fp32"] = "fp16"   # weights of the frozen OPT
    prompt: str = ""                          # precedes every caption (caption fine-tuning: "a photo of")
    max_txt_len: int = 32                     # OPT tokens of `</s>` + prompt + caption + "\n"
    pretrained: Optional[str] = None          # stage-1 checkpoint to start from, or a stage-2 one (LAVIS/ours/HF)


def create_model(cfg, language_model=None):
    """(Blip2OPT, the OPT tokenizer) for a Blip2OPTConfig: the architecture and its frozen parts from their files,
    the OPT (`opt_model`, or `language_model` = (OPTForCausalLM, tokenizer) already built) and a frozen image
    encoder (`vit_pretrained`, else the image encoder in `pretrained`: BLIP-2's stage-2 configs take it from the
    stage-1 checkpoint). The trainable parts come from a checkpoint (load_checkpoint)."""
    opt_model, opt_tokenizer = language_model or load_opt(cfg.opt_model, cfg.opt_precision)
    model = Blip2OPT(opt_model, opt_tokenizer, **cfg.encoder_kwargs(), qformer=cfg.qformer,
                     num_query_tokens=cfg.num_query_tokens, cross_attention_freq=cfg.cross_attention_freq,
                     prompt=cfg.prompt, max_txt_len=cfg.max_txt_len)
    if cfg.vit_pretrained:
        load_vision_file(model.visual_encoder, cfg.vit_pretrained)
        model.vit_source = cfg.vit_pretrained
    elif cfg.freeze_vit and cfg.pretrained:
        state = load_checkpoint_file(cfg.pretrained)
        state = state.get("model", state)
        if any(k.startswith(("visual_encoder.", "vision_model.")) for k in state):
            load_vision_weights(model.visual_encoder, _lavis_layout(state))
            model.vit_source = cfg.pretrained
    return model, opt_tokenizer


def _lavis_layout(state):
    return hf_to_lavis(state) if any(k.startswith("vision_model.") for k in state) else state


class Blip2OPT(nn.Module):
    """Frozen image encoder -> ln_vision -> Q-Former (queries only) -> opt_proj -> frozen OPT.

    `opt_model` (an OPTForCausalLM, in the precision it should run in) is frozen here; `opt_tokenizer` is OPT's
    (it starts every text with `</s>`). `prompt` precedes every caption, in training without loss.

    `state_dict()` leaves out the frozen weights that come from files of their own: the OPT always, and the frozen
    image encoder once `vit_source` names the file it was loaded from. `load_state_dict` does not ask for them.
    """

    def __init__(self, opt_model, opt_tokenizer, vision="eva_vit_g", image_size=224, patch_size=None, freeze_vit=True,
                 vit_precision="fp16", drop_path_rate=0.0, vit_grad_ckpt_layers=0, qformer="base", num_query_tokens=32,
                 cross_attention_freq=2, ln_vision_eps=1e-5, prompt="", max_txt_len=32):
        super().__init__()
        self.visual_encoder = create_vision_encoder(vision, image_size, drop_path_rate, vit_grad_ckpt_layers,
                                                    patch_size)
        if freeze_vit:
            freeze_vision_encoder(self.visual_encoder, DTYPES[vit_precision])
        self.vit_source = None
        width = self.visual_encoder.num_features
        self.ln_vision = nn.LayerNorm(width, eps=ln_vision_eps)
        self.Qformer = build_qformer(qformer, vocab_size=0, encoder_width=width,
                                     cross_attention_freq=cross_attention_freq, text_input=False)
        hidden = self.Qformer.bert.config.hidden_size
        self.query_tokens = nn.Parameter(torch.randn(1, num_query_tokens, hidden) * 0.02)
        self.opt_model = opt_model.requires_grad_(False).eval()
        self.opt_tokenizer = opt_tokenizer
        # OPT-350m embeds in a narrower space than its hidden size; inputs_embeds live in the embedding space.
        self.opt_proj = nn.Linear(hidden, opt_model.get_input_embeddings().embedding_dim)
        self.eos_token_id = _newline_id(opt_tokenizer)
        self.prompt = prompt
        self.max_txt_len = max_txt_len
        self.register_state_dict_post_hook(_drop_frozen_weights)
        self.register_load_state_dict_post_hook(_allow_missing_frozen_weights)

    def frozen_prefixes(self):
        """Key prefixes that checkpoints leave out (see the class docstring)."""
        from_file = self.visual_encoder.frozen and self.vit_source is not None
        return ("opt_model.", "visual_encoder.") if from_file else ("opt_model.",)

    def train(self, mode=True):
        super().train(mode)
        self.opt_model.eval()  # frozen: no dropout, whatever the trainer asks
        return self

    # ------------------------------------------------------------------------------------------------ encoders

    def image_embeddings(self, images):
        """images [B, 3, S, S] -> ln_vision(image tokens) [B, N, Dv] in fp32. `images` may also be the frozen
        encoder's own tokens [B, N, Dv] (data/feature_cache.py), which skip the encoder."""
        tokens = images if images.dim() == 3 else self.visual_encoder(images)
        return self.ln_vision(tokens.float())

    def soft_prompt(self, images):
        """images [B, 3, S, S] or the frozen encoder's tokens [B, N, Dv] -> opt_proj(query outputs) [B, Q, D] in
        the OPT's dtype."""
        image_embeds = self.image_embeddings(images)
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        hidden, _ = self.Qformer.bert(query_embeds=queries, image_embeds=image_embeds)
        return self.opt_proj(hidden).to(self.opt_model.dtype)

    def caption_tokens(self, captions, device):
        """OPT tokens of `prompt caption\\n` (right-padded, truncated to max_txt_len): ids, attention mask and labels
        [B, L]; labels are -100 on `</s>`, the prompt and padding."""
        texts = [f"{self.prompt} {c}\n" if self.prompt else f"{c}\n" for c in captions]
        tokens = self.opt_tokenizer(texts, padding="longest", truncation=True, max_length=self.max_txt_len,
                                    return_tensors="pt").to(device)
        labels = tokens.input_ids.masked_fill(tokens.attention_mask == 0, -100)
        labels[:, :self.prompt_length()] = -100
        return tokens.input_ids, tokens.attention_mask, labels

    def prompt_length(self):
        """Tokens of `</s>` + prompt."""
        return len(self.opt_tokenizer(self.prompt).input_ids)

    # -------------------------------------------------------------------------------------------------- losses

    def caption_logits(self, images, input_ids, attention_mask):
        """Logits [B, L - 1, vocab] in fp32 of tokens 1..L-1 of `input_ids` [B, L], each image's soft prompt first.

        Only text positions predict labelled tokens (the last query predicts `</s>`, which is never labelled), so
        the LM head skips the queries and their [B, Q, vocab] logits."""
        prefix = self.soft_prompt(images)
        embeds = torch.cat([prefix, self.opt_model.get_input_embeddings()(input_ids)], 1)
        mask = torch.cat([attention_mask.new_ones(prefix.shape[:2]), attention_mask], 1)
        hidden = self.opt_model.model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        return self.opt_model.lm_head(hidden[:, prefix.shape[1]:-1]).float()

    def forward(self, images, captions):
        """{"loss": next-token cross-entropy of `captions` (B strings) given their images, averaged over the
        labelled tokens of the global batch}. `images` [B, 3, S, S], or the frozen encoder's tokens [B, N, Dv]."""
        ids, mask, labels = self.caption_tokens(captions, images.device)
        logits = self.caption_logits(images, ids, mask)
        targets = labels[:, 1:].flatten()
        # The mean over the tokens of the global batch, as in the stage-1 ITG loss: one process or many, the same.
        global_tokens = all_reduce_sum((targets != -100).sum()).clamp(min=1)
        loss_sum = F.cross_entropy(logits.flatten(0, 1), targets, reduction="sum")
        return {"loss": loss_sum * get_world_size() / global_tokens}

    # ---------------------------------------------------------------------------------------------- captioning

    @torch.no_grad()
    def generate(self, images, num_beams=5, max_new_tokens=30, min_new_tokens=8, repetition_penalty=1.0,
                 length_penalty=1.0, use_nucleus_sampling=False, top_p=0.9, temperature=1.0, num_captions=1,
                 prompt=None):
        """New token ids [B * num_captions, T] after the soft prompt and `</s>` + prompt (`self.prompt` unless
        given), from transformers' generate on the frozen OPT: beam search, or nucleus sampling with `top_p`.
        "\\n" ends a caption; finished rows are padded."""
        prompt = self.prompt if prompt is None else prompt
        prefix = self.soft_prompt(images)
        prompt_ids = self.opt_tokenizer([prompt] * images.shape[0], return_tensors="pt").input_ids.to(images.device)
        embeds = torch.cat([prefix, self.opt_model.get_input_embeddings()(prompt_ids)], 1)
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=images.device)
        sampling = dict(do_sample=True, top_p=top_p, temperature=temperature) if use_nucleus_sampling else {}
        return self.opt_model.generate(inputs_embeds=embeds, attention_mask=mask, num_beams=num_beams,
                                       max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                                       eos_token_id=self.eos_token_id, pad_token_id=self.opt_tokenizer.pad_token_id,
                                       repetition_penalty=repetition_penalty, length_penalty=length_penalty,
                                       num_return_sequences=num_captions, **sampling)

    def caption(self, images, **generate_kwargs):
        """Captions of `images` as strings (the prompt not included); arguments as `generate`."""
        ids = self.generate(images, **generate_kwargs)
        return [text.strip() for text in self.opt_tokenizer.batch_decode(ids, skip_special_tokens=True)]


def _newline_id(tokenizer):
    ids = tokenizer("\n", add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise InputError(f"the OPT tokenizer encodes '\\n' as {ids}; BLIP-2 needs it as one token (the end of a "
                         "caption)")
    return ids[0]


def _drop_frozen_weights(module, state_dict, prefix, local_metadata):
    for key in [k for k in state_dict if k[len(prefix):].startswith(module.frozen_prefixes())]:
        del state_dict[key]


def _allow_missing_frozen_weights(module, incompatible_keys):
    missing = incompatible_keys.missing_keys
    missing[:] = [k for k in missing if not k.startswith(module.frozen_prefixes())]


def load_opt(name_or_dir, precision="fp16"):
    """(OPTForCausalLM with weights in `precision`, its tokenizer) from a hub name such as facebook/opt-2.7b or a
    local directory in transformers' format."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_dir)
        model = OPTForCausalLM.from_pretrained(name_or_dir, dtype=DTYPES[precision])
    except OSError as e:
        raise InputError(f"cannot load the OPT model '{name_or_dir}' ({e}). Offline, run `hf download {name_or_dir} "
                         f"--local-dir /path/to/opt` on a machine with internet and set model.opt_model to that "
                         "directory") from None
    tokenizer.padding_side = "right"
    return model, tokenizer


# ------------------------------------------------------------------------------------------------ checkpoints

def load_checkpoint(model, url_or_path):
    """Load a checkpoint (path or URL) into a Blip2OPT: LAVIS's blip2_opt (`blip2_pretrained_opt2.7b.pth`) or this
    project's stage-2 checkpoints; a stage-1 checkpoint (LAVIS's `blip2_pretrained.pth` or this project's), whose
    text-side Q-Former parts and heads are dropped and after which `opt_proj` keeps its initialisation; or a
    transformers Blip2ForConditionalGeneration state dict, whose `language_model.*` are not used (the OPT comes from
    model.opt_model). Image-encoder weights in the file set `model.vit_source`."""
    ckpt = load_checkpoint_file(url_or_path)
    state = _lavis_layout(ckpt.get("model", ckpt))
    vision = {k: v for k, v in state.items() if k.startswith("visual_encoder.")}
    if vision:
        load_vision_weights(model.visual_encoder, vision)
        model.vit_source = url_or_path
    elif model.visual_encoder.frozen and model.vit_source is None:
        recorded = ckpt.get("config", {}).get("model", {})
        sources = {k: recorded[k] for k in ("vit_pretrained", "pretrained") if recorded.get(k)}
        raise InputError(f"{url_or_path} holds no image-encoder weights and the config names no file for them; set "
                         f"model.vit_pretrained or model.pretrained as in training ({sources or 'not recorded'})")

    dropped = [k for k in state if STAGE1_ONLY.match(k) or k.startswith("opt_model.")]
    theirs = {k: v for k, v in state.items() if not k.startswith("visual_encoder.") and k not in dropped
              and not k.endswith("position_ids")}
    ours = {k: v for k, v in model.state_dict().items() if not k.startswith("visual_encoder.")}
    problems = [f"unexpected {k}" for k in theirs if k not in ours]
    problems += [f"{k} is {tuple(v.shape)}, the model's {tuple(ours[k].shape)}" for k, v in theirs.items()
                 if k in ours and v.shape != ours[k].shape]
    from_stage1 = any(STAGE1_ONLY.match(k) for k in dropped)
    absent = [k for k in ours if k not in theirs and not (from_stage1 and k.startswith("opt_proj."))]
    problems += [f"missing {k}" for k in absent]
    if problems:
        raise InputError(f"{url_or_path} does not fit the stage-2 model ({len(problems)} problems: "
                         f"{'; '.join(problems[:4])}). Check model.vision, model.qformer, model.num_query_tokens and "
                         "model.opt_model")
    if dropped:
        log(f"{url_or_path}: {len(dropped)} tensors the stage-2 model does not use are ignored "
            f"({', '.join(sorted({k.split('.')[0] for k in dropped}))})")
    if from_stage1:
        log(f"{url_or_path} is a stage-1 checkpoint: opt_proj keeps its initialisation")
    model.load_state_dict(theirs, strict=False)


def to_hf_generation(state, opt_state):
    """LAVIS blip2_opt state dict and the OPT's state dict -> transformers Blip2ForConditionalGeneration state dict."""
    return lavis_to_hf({**state, **{f"opt_model.{k}": v for k, v in opt_state.items()}})


def from_hf_generation(hf):
    """Inverse of `to_hf_generation`: (LAVIS blip2_opt state dict, the OPT's state dict)."""
    state = hf_to_lavis(hf)
    opt = {k[len("opt_model."):]: state.pop(k) for k in list(state) if k.startswith("opt_model.")}
    return state, opt
