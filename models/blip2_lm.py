"""BLIP-2 with a frozen language model: the Q-Former's query outputs as a soft prompt of any transformers LM.

    images [B, 3, S, S] -> frozen image encoder -> ln_vision [B, N, Dv] -> Q-Former queries [B, Q, H]
    (InstructBLIP: the queries and the instruction's BERT tokens [B, I] together, bidirectionally; only the Q query
    outputs go on) -> {opt,llm,t5}_proj [B, Q, D] -> the frozen language model's input embeddings.

- `Blip2CausalLM`, a decoder-only LM (OPT, LLaMA/Vicuna, ...): [soft prompt; text_input; text_output] with the
  next-token loss on text_output only, the LM head run only where a label is predicted. With OPT it follows
  LAVIS `blip2_opt` (projection `opt_proj`), with other LMs LAVIS `blip2_vicuna_instruct` (projection `llm_proj`).
- `Blip2T5` (LAVIS `blip2_t5`, `blip2_t5_instruct`): T5's encoder reads [soft prompt; text_input], its decoder
  predicts text_output (projection `t5_proj`).
- `qformer_tokenizer` given: InstructBLIP (LAVIS's `qformer_text_input`); the Q-Former then keeps its word/position
  embeddings and text FFNs (no `Qformer.cls` head) and reads text_input (the instruction) next to the queries.

State-dict keys are LAVIS's: `visual_encoder.*`, `ln_vision.*`, `query_tokens`, `Qformer.bert.*` and the projection.
The language model comes from its own files and never enters a checkpoint (nor does the frozen image encoder once
`vit_source` names its file); LoRA adapters (`add_lora`) do. `to_transformers`/`from_transformers` convert to and
from transformers' Blip2ForConditionalGeneration / InstructBlipForConditionalGeneration layouts, `load_state` loads
either layout, `read_transformers`/`save_transformers` read and write transformers directories.
"""

import json
import os
import re
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, Blip2Config,
                          Blip2ForConditionalGeneration, InstructBlipConfig, InstructBlipForConditionalGeneration,
                          T5ForConditionalGeneration)

from models.blip2_qformer import LM_NAMES, hf_to_lavis, lavis_to_hf
from models.eva_vit import (EvaViT, VisionConfig, create_vision_encoder, freeze_vision_encoder, load_vision_file,
                            load_vision_weights)
from models.families import refuse_other_families
from models.qformer import build_qformer, padding_mask
from models.tokenizer import init_tokenizer, local_dir_or_hub_id
from utils import DTYPES, InputError, Precision, all_reduce_sum, get_world_size, load_checkpoint_file, log

CHECKPOINT_URLS = {  # LAVIS's releases (LANGUAGE_MODELS_VQA.md section 2)
    name: f"https://storage.googleapis.com/sfr-vision-language-research/LAVIS/models/{path}" for name, path in {
        "pretrain_opt2.7b": "BLIP2/blip2_pretrained_opt2.7b.pth",
        "pretrain_opt6.7b": "BLIP2/blip2_pretrained_opt6.7b.pth",
        "caption_coco_opt2.7b": "BLIP2/blip2_caption_opt2.7b.pth",
        "pretrain_flant5xl": "BLIP2/blip2_pretrained_flant5xl.pth",
        "pretrain_flant5xxl": "BLIP2/blip2_pretrained_flant5xxl.pth",
        "caption_coco_flant5xl": "BLIP2/blip2_caption_flant5xl.pth",
        "instruct_vicuna7b": "InstructBLIP/instruct_blip_vicuna7b_trimmed.pth",
        "instruct_vicuna13b": "InstructBLIP/instruct_blip_vicuna13b_trimmed.pth",
        "instruct_flant5xl": "InstructBLIP/instruct_blip_flanxl_trimmed.pth",
        "instruct_flant5xxl": "InstructBLIP/instruct_blip_flanxxl_trimmed.pth"}.items()}
# arch: (LM family, instruction-aware Q-Former). LAVIS's names: blip2_opt, blip2_t5, blip2_t5_instruct; our
# blip2_llm(_instruct) is LAVIS's blip2_vicuna_instruct without (with) the instruction, for any LLaMA-class LM.
ARCHS = {"blip2_opt": ("causal", False), "blip2_llm": ("causal", False), "blip2_llm_instruct": ("causal", True),
         "blip2_t5": ("t5", False), "blip2_t5_instruct": ("t5", True)}


@dataclass
class LoraSettings:
    """`model.lora`: peft LoRA adapters on the frozen LM."""
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: Optional[list[str]] = None  # null: peft's default for the LM (q_proj, v_proj; T5: q, v)


@dataclass
class Blip2LMConfig(VisionConfig):
    """The `model:` section of a stage-2 config (BLIP-2 with a frozen LM, InstructBLIP)."""
    arch: Literal["blip2_opt", "blip2_llm", "blip2_llm_instruct", "blip2_t5", "blip2_t5_instruct"] = "blip2_opt"
    qformer: Literal["tiny", "base"] = "base"
    num_query_tokens: int = 32
    cross_attention_freq: int = 2
    lm: str = "facebook/opt-2.7b"             # hub name, local directory, or a transformers BLIP-2 directory
    lm_precision: Optional[Precision] = None  # frozen LM weights; null: bf16 for T5 (overflows in fp16), else fp16
    lm_dropout: bool = True                   # the frozen LM's dropout in training (LAVIS: on)
    t5_dense_act_fn: Optional[str] = "gelu"   # LAVIS's exact GELU in Flan-T5's FFN; null: the checkpoint's own
    tokenizer: str = "bert-base-uncased"      # *_instruct: the Q-Former's tokenizer for the instruction
    prompt: str = ""                          # before every caption (text_input of caption data) and generation
    max_txt_len: Optional[int] = None         # tokens of text_input (OPT: all text); null: 128 *_instruct, else 32
    max_output_txt_len: Optional[int] = None  # tokens of text_output; null: 32 T5, 256 otherwise (unused by OPT)
    end_of_text: Optional[str] = None         # ends text_output (causal LMs); null: "\n" for OPT, the LM's eos
    lora: Optional[LoraSettings] = None       # LoRA adapters on the LM (only they train in it)
    pretrained: Optional[str] = None          # a stage-1 or stage-2 checkpoint (LAVIS, ours, transformers dir/file)

    def lm_kwargs(self):
        """The keyword arguments of Blip2CausalLM / Blip2T5 beyond the LM, its tokenizer and the Q-Former's."""
        family, instruct = ARCHS[self.arch]
        kwargs = dict(**self.encoder_kwargs(), qformer=self.qformer, num_query_tokens=self.num_query_tokens,
                      cross_attention_freq=self.cross_attention_freq, prompt=self.prompt, lm_dropout=self.lm_dropout,
                      max_txt_len=self.max_txt_len or (128 if instruct else 32))
        if self.max_output_txt_len is not None:
            kwargs["max_output_txt_len"] = self.max_output_txt_len
        if family == "causal":
            kwargs["end_of_text"] = self.end_of_text
        return kwargs


def create_model(cfg, language_model=None):
    """(Blip2CausalLM or Blip2T5 for a Blip2LMConfig, the LM's tokenizer): the architecture and its frozen parts from
    their files, the LM (`lm`, or `language_model` = (model, tokenizer) already built) and a frozen image encoder
    (`vit_pretrained`, else the image encoder in `pretrained`: BLIP-2's stage-2 configs take it from the stage-1
    checkpoint); LoRA adapters at their initialisation. The trainable parts come from a checkpoint
    (load_checkpoint)."""
    family, instruct = ARCHS[cfg.arch]
    if cfg.arch == "blip2_opt" and language_model is None and not _is_opt(cfg.lm):
        raise InputError(f"model.arch blip2_opt needs an OPT, but model.lm {cfg.lm} is another language model; use "
                         "model.arch blip2_llm for it")
    lm, tokenizer = language_model or load_language_model(cfg)
    qformer_tokenizer = init_tokenizer(cfg.tokenizer, enc_token=False) if instruct else None
    model_class = Blip2T5 if family == "t5" else Blip2CausalLM
    model = model_class(lm, tokenizer, qformer_tokenizer=qformer_tokenizer, **cfg.lm_kwargs())
    if cfg.vit_pretrained:
        load_vision_file(model.visual_encoder, cfg.vit_pretrained)
        model.vit_source = cfg.vit_pretrained
    elif cfg.freeze_vit and cfg.pretrained:
        state = read_checkpoint(cfg.pretrained).get("model", {})
        vision = hf_to_lavis(state) if any(k.startswith("vision_model.") for k in state) else state
        if any(k.startswith("visual_encoder.") for k in vision):
            load_vision_weights(model.visual_encoder, vision, cfg.pretrained)
            model.vit_source = cfg.pretrained
    if cfg.lora:
        add_lora(model, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules)
    return model, tokenizer


def load_language_model(cfg):
    """(frozen LM in cfg.lm_precision, tokenizer) of a Blip2LMConfig's `lm`: a hub name or a local directory of the
    LM, or a transformers BLIP-2 / InstructBLIP directory (its language model and tokenizer)."""
    family, _ = ARCHS[cfg.arch]
    precision = cfg.lm_precision or ("bf16" if family == "t5" else "fp16")
    if family == "t5":
        return load_t5(cfg.lm, precision, cfg.t5_dense_act_fn)
    return load_causal_lm(cfg.lm, precision)


def load_checkpoint(model, url_or_path):
    """load_state from a checkpoint file (path or URL: LAVIS's, ours, a transformers state dict) or a transformers
    BLIP-2 / InstructBLIP directory (e.g. Salesforce/blip2-flan-t5-xl downloaded), whose language model weights are
    then loaded too when `model.lm` is that directory. Returns the model's keys left at their initialisation (the
    projection after a stage-1 checkpoint, LoRA adapters the file lacks)."""
    return load_state(model, read_checkpoint(url_or_path), url_or_path)


def read_checkpoint(url_or_path):
    """The checkpoint dict {"model": state dict, ...} of a file or URL, or of a transformers directory."""
    if os.path.isdir(url_or_path):
        return {"model": read_transformers(url_or_path)[1]}
    ckpt = load_checkpoint_file(url_or_path)
    return ckpt if "model" in ckpt else {"model": ckpt}


def _is_opt(name_or_dir):
    path = os.path.join(name_or_dir, "config.json")
    if os.path.isfile(path):
        with open(path) as f:
            config = json.load(f)
        return config.get("text_config", config).get("model_type") == "opt"
    return "opt" in os.path.basename(name_or_dir.rstrip("/")).lower()

# What a stage-1 checkpoint holds and no stage-2 model has; without the instruction the Q-Former's text side too.
STAGE1_HEADS = r"Qformer\.cls\.|vision_proj\.|text_proj\.|itm_head\.|temp$"
QFORMER_TEXT = (r"Qformer\.bert\.embeddings\.(word|position)_embeddings\.|"
                r"Qformer\.bert\.encoder\.layer\.\d+\.(intermediate|output)\.")
# Keys only transformers' layouts have.
TRANSFORMERS_PREFIXES = ("vision_model.", "qformer.", "language_projection.", "language_model.")


class Blip2LM(nn.Module):
    """Frozen image encoder -> ln_vision -> Q-Former -> `{lm_name}_proj` -> frozen `{lm_name}_model`: what
    Blip2CausalLM and Blip2T5 share.

    `lm` (a transformers model, in the precision it should run in) is frozen here; `tokenizer` is its tokenizer.
    `qformer_tokenizer` (models.tokenizer.init_tokenizer(..., enc_token=False)) makes it InstructBLIP: text_input
    (the instruction) is cut on the left to `max_txt_len` BERT tokens and enters the Q-Former. `prompt` is what
    `generate` puts after the soft prompt when given none. `lm_dropout` False keeps the frozen LM in eval mode;
    LAVIS leaves it in train mode (its dropout active while the model trains), the default here. `lm_name` is
    LAVIS's name of the LM and its projection (LM_NAMES: `{lm_name}_model`, `{lm_name}_proj`).

    `state_dict()` leaves out the frozen weights that come from files of their own: the LM's, but for what trains in
    it (LoRA adapters) and unless `lm_in_state_dict` (merge_lora), and the frozen image encoder's once `vit_source`
    names the file it was loaded from. `load_state_dict` does not ask for them.
    """

    def __init__(self, lm, tokenizer, lm_name, qformer_tokenizer=None, vision="eva_vit_g", image_size=224,
                 patch_size=None, freeze_vit=True, vit_precision="fp16", drop_path_rate=0.0, vit_grad_ckpt_layers=0,
                 qformer="base", num_query_tokens=32, cross_attention_freq=2, ln_vision_eps=1e-5, prompt="",
                 max_txt_len=32, max_output_txt_len=256, lm_dropout=True):
        super().__init__()
        self.visual_encoder = create_vision_encoder(vision, image_size, drop_path_rate, vit_grad_ckpt_layers,
                                                    patch_size)
        if freeze_vit:
            freeze_vision_encoder(self.visual_encoder, DTYPES[vit_precision])
        self.vit_source = None
        width = self.visual_encoder.num_features
        self.ln_vision = nn.LayerNorm(width, eps=ln_vision_eps)
        self.qformer_tokenizer = qformer_tokenizer
        self.qformer_text_input = qformer_tokenizer is not None
        self.Qformer = build_qformer(qformer, vocab_size=len(qformer_tokenizer) if self.qformer_text_input else 0,
                                     encoder_width=width, cross_attention_freq=cross_attention_freq,
                                     text_input=self.qformer_text_input, lm_head=False)
        if self.qformer_text_input and max_txt_len > self.Qformer.bert.config.max_position_embeddings:
            raise InputError(f"max_txt_len {max_txt_len} exceeds the Q-Former's "
                             f"{self.Qformer.bert.config.max_position_embeddings} positions; lower it")
        if self.qformer_text_input:
            # Nothing reads the instruction's last-layer outputs (query_outputs), so that layer's text FFN never
            # runs: frozen, as DDP wants every trainable weight to get a gradient. Checkpoints keep it (LAVIS's
            # layout; LAVIS computes it, and trains it with zero gradients, i.e. weight decay only).
            last = self.Qformer.bert.encoder.layer[-1]
            last.intermediate.requires_grad_(False)
            last.output.requires_grad_(False)
        hidden = self.Qformer.bert.config.hidden_size
        self.query_tokens = nn.Parameter(torch.randn(1, num_query_tokens, hidden) * 0.02)
        self.lm_name = lm_name
        setattr(self, f"{lm_name}_model", lm.requires_grad_(False))
        self.lm_tokenizer = tokenizer
        # OPT-350m embeds in a narrower space than its hidden size; inputs_embeds live in the embedding space.
        setattr(self, f"{lm_name}_proj", nn.Linear(hidden, lm.get_input_embeddings().embedding_dim))
        self.prompt = prompt
        self.max_txt_len = max_txt_len
        self.max_output_txt_len = max_output_txt_len
        self.lm_dropout = lm_dropout
        self.lm_in_state_dict = False  # True once the LM's weights are no longer its files' (merge_lora)
        self.register_state_dict_post_hook(_drop_frozen_weights)
        self.register_load_state_dict_post_hook(_allow_missing_frozen_weights)
        self.train()

    @property
    def language_model(self):
        return getattr(self, f"{self.lm_name}_model")

    @property
    def language_projection(self):
        return getattr(self, f"{self.lm_name}_proj")

    def left_out(self, keys):
        """Those of `keys` (the model's own names) that checkpoints leave out (see the class docstring)."""
        lm = f"{self.lm_name}_model."
        trained = {lm + n for n, p in self.language_model.named_parameters() if p.requires_grad}
        vit_from_file = self.visual_encoder.frozen and self.vit_source is not None
        return [k for k in keys if (k.startswith(lm) and not self.lm_in_state_dict and k not in trained)
                or (vit_from_file and k.startswith("visual_encoder."))]

    def train(self, mode=True):
        super().train(mode)
        if not self.lm_dropout:
            self.language_model.eval()
        return self

    # ------------------------------------------------------------------------------------------------ encoders

    def image_embeddings(self, images):
        """images [B, 3, S, S] -> ln_vision(image tokens) [B, N, Dv] in fp32. `images` may also be the frozen
        encoder's own tokens [B, N, Dv] (data/feature_cache.py), which skip the encoder."""
        tokens = images if images.dim() == 3 else self.visual_encoder(images)
        return self.ln_vision(tokens.float())

    def query_outputs(self, images, instructions=None):
        """The Q-Former's query outputs [B, Q, H]. InstructBLIP: the queries and the BERT tokens of `instructions`
        (B strings) attend to each other (padding masked), the queries also to the image; the instruction's
        last-layer outputs, which nothing reads, are not computed."""
        image_embeds = self.image_embeddings(images)
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        if not self.qformer_text_input:
            return self.Qformer.bert(query_embeds=queries, image_embeds=image_embeds)[0]
        tokens = _tokenize(self.qformer_tokenizer, instructions, self.max_txt_len, "left").to(image_embeds.device)
        mask = padding_mask(torch.cat([tokens.attention_mask.new_ones(queries.shape[:2]), tokens.attention_mask], 1))
        return self.Qformer.bert(tokens.input_ids, queries, mask, image_embeds, keep=queries.shape[1])[0]

    def soft_prompt(self, images, instructions=None):
        """The projected query outputs [B, Q, D] in the LM's dtype (see query_outputs)."""
        hidden = self.query_outputs(images, instructions)
        return self.language_projection(hidden).to(self.language_model.get_input_embeddings().weight.dtype)

    def embed(self, input_ids):
        return self.language_model.get_input_embeddings()(input_ids)

    def with_soft_prompt(self, images, instructions, tokens):
        """inputs_embeds [B, Q + L, D] and attention mask [B, Q + L] of `tokens` (input_ids and attention_mask
        [B, L]) after the images' soft prompt; without images (None) the tokens alone."""
        embeds, mask = self.embed(tokens.input_ids), tokens.attention_mask
        if images is None:
            return embeds, mask
        prefix = self.soft_prompt(images, instructions)
        return torch.cat([prefix, embeds], 1), torch.cat([mask.new_ones(prefix.shape[:2]), mask], 1)

    # ---------------------------------------------------------------------------------------------- generation

    @torch.no_grad()
    def generate(self, images, prompt=None, num_beams=5, max_new_tokens=30, min_new_tokens=8, repetition_penalty=1.0,
                 length_penalty=1.0, use_nucleus_sampling=False, top_p=0.9, temperature=1.0, num_captions=1):
        """New token ids [B * num_captions, T] given the soft prompt and `prompt` (one string for every image, or B
        of them; `self.prompt` unless given; InstructBLIP's instruction too), from transformers' generate on the
        frozen LM: beam search, or nucleus sampling with `top_p`. Finished rows are padded. `images` None: the LM
        alone, from the prompts (the text-only baseline)."""
        prompt = self.prompt if prompt is None else prompt
        batch = 1 if images is None else images.shape[0]
        prompts = [prompt] * batch if isinstance(prompt, str) else list(prompt)
        embeds, mask = self.generation_inputs(images, prompts)
        # do_sample always given: some LMs' own generation configs sample (Vicuna v1.5's)
        sampling = dict(top_p=top_p, temperature=temperature) if use_nucleus_sampling else {}
        ids = self.language_model.generate(inputs_embeds=embeds, attention_mask=mask, num_beams=num_beams,
                                           do_sample=use_nucleus_sampling,
                                           max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                                           eos_token_id=self.eos_token_id, pad_token_id=self.lm_tokenizer.pad_token_id,
                                           repetition_penalty=repetition_penalty, length_penalty=length_penalty,
                                           num_return_sequences=num_captions, **sampling)
        return ids[:, self.generated_from:]

    def caption(self, images, **generate_kwargs):
        """The generated texts as strings (the prompt not included), stripped; arguments as `generate`."""
        ids = self.generate(images, **generate_kwargs)
        return [text.strip() for text in self.lm_tokenizer.batch_decode(ids, skip_special_tokens=True)]


class Blip2CausalLM(Blip2LM):
    """BLIP-2 with a frozen decoder-only LM (`AutoModelForCausalLM`): LAVIS's `blip2_opt` for OPT, its
    `blip2_vicuna_instruct` for the others (LLaMA, Vicuna). Arguments of Blip2LM, and:

    `end_of_text` ends every text_output and generation: "\\n" for OPT (LAVIS), the tokenizer's eos otherwise.
    A tokenizer without a pad token pads with its unk token (else its eos): padding is masked out of attention and
    labels by the attention mask, so its id never matters, and the LM's vocabulary stays as it is (LAVIS adds
    `[PAD]` to Vicuna's tokenizer and resizes the embeddings, which only adds a row no input ever uses).

    Text layouts (the BOS is whatever the tokenizer puts first: OPT `</s>`, LLaMA `<s>`):
    - OPT (blip2_opt): `text_input text_output\\n` as one text, right-padded, cut on the right to max_txt_len
      tokens in all; the tokens of text_input (with the BOS) carry no loss.
    - others (blip2_vicuna_instruct): [text_input tokens (BOS first, cut on the left to max_txt_len); text_output
      + eos (cut on the right to max_output_txt_len, the BOS counted as LAVIS counts it); padding] per row.
    Generation: [soft prompt; prompt tokens], the prompts left-padded when their lengths differ.
    """

    generated_from = 0  # generate's output holds the new tokens only

    def __init__(self, lm, tokenizer, end_of_text=None, **kwargs):
        opt = lm.config.model_type == "opt"
        super().__init__(lm, tokenizer, "opt" if opt else "llm", **kwargs)
        self.joined_text = opt
        self.end_of_text = end_of_text or ("\n" if opt else tokenizer.eos_token)
        self.eos_token_id = _single_token_id(tokenizer, self.end_of_text)
        self.num_bos = len(tokenizer("").input_ids)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
            log(f"the language model's tokenizer has no pad token: it pads with {tokenizer.pad_token}")

    def text_tokens(self, text_input, text_output, device):
        """LM tokens of the pairs (B strings each; see the class docstring): ids, attention mask and labels
        [B, L]; labels are -100 but on text_output and its end."""
        tokenizer = self.lm_tokenizer
        if self.joined_text:
            texts = [f"{i} {o}{self.end_of_text}" if i else f"{o}{self.end_of_text}"
                     for i, o in zip(text_input, text_output)]
            tokens = _tokenize(tokenizer, texts, self.max_txt_len, "right").to(device)
            labels = tokens.input_ids.masked_fill(tokens.attention_mask == 0, -100)
            for row, ids in enumerate(tokenizer(list(text_input)).input_ids):
                labels[row, :len(ids)] = -100
            return tokens.input_ids, tokens.attention_mask, labels
        inputs = _tokenize(tokenizer, text_input, self.max_txt_len, "left")
        outputs = _tokenize(tokenizer, [o + self.end_of_text for o in text_output],
                            self.max_output_txt_len - self.num_bos, "right", add_special_tokens=False)
        # Part of every position: 0 input, 1 output, 2 padding of either; a stable sort by part moves the input's
        # padding behind the output (LAVIS's concat_text_input_output).
        part = torch.cat([2 * (1 - inputs.attention_mask), 2 - outputs.attention_mask], 1)
        order = part.argsort(dim=1, stable=True)
        ids = torch.cat([inputs.input_ids, outputs.input_ids], 1).gather(1, order)
        mask = torch.cat([inputs.attention_mask, outputs.attention_mask], 1).gather(1, order)
        labels = ids.masked_fill(part.gather(1, order) != 1, -100)
        return ids.to(device), mask.to(device), labels.to(device)

    def predicting(self, labels):
        """Which text positions [B, L - 1] of labels [B, L] the LM head runs on (position i predicts token i + 1):
        those that predict a labelled token, so that the soft prompt, the prompt and an instruction cost no
        [length, vocab] logits."""
        return labels[:, 1:] != -100

    def text_logits(self, images, input_ids, attention_mask, labels, text_input):
        """Logits [N, vocab] in fp32 at the N `predicting` positions of input_ids [B, L] (row by row), each image's
        soft prompt first. No query and not the last position predicts a labelled token: the head skips them."""
        prefix = self.soft_prompt(images, text_input)
        embeds = torch.cat([prefix, self.embed(input_ids)], 1)
        mask = torch.cat([attention_mask.new_ones(prefix.shape[:2]), attention_mask], 1)
        keep = F.pad(self.predicting(labels), (prefix.shape[1], 1))
        return self.language_model(inputs_embeds=embeds, attention_mask=mask, logits_to_keep=keep).logits.float()

    def forward(self, images, text_input, text_output):
        """{"loss": next-token cross-entropy of text_output given the images and text_input (B strings each),
        averaged over the labelled tokens of the global batch}. `images` [B, 3, S, S], or the frozen encoder's
        tokens [B, N, Dv]. A caption batch is text_input = [prompt] * B, text_output = the captions."""
        ids, mask, labels = self.text_tokens(text_input, text_output, images.device)
        logits = self.text_logits(images, ids, mask, labels, text_input)
        return {"loss": token_mean_loss(logits, labels[:, 1:][self.predicting(labels)])}

    def generation_inputs(self, images, prompts):
        """inputs_embeds [B, Q + P, D] and attention mask [B, Q + P]: the soft prompt (none without images), then
        the left-padded prompt tokens (with the BOS)."""
        tokens = self.lm_tokenizer(prompts, padding="longest", padding_side="left", return_tensors="pt")
        return self.with_soft_prompt(images, prompts, tokens.to(self.query_tokens.device))


class Blip2T5(Blip2LM):
    """BLIP-2 with a frozen T5 (`T5ForConditionalGeneration`, Flan-T5; see load_t5): LAVIS's `blip2_t5`, and
    `blip2_t5_instruct` with a `qformer_tokenizer`. Arguments of Blip2LM.

    T5's encoder reads [soft prompt; T5 tokens of text_input (+ `</s>`), cut to max_txt_len on the right, on the
    left for InstructBLIP, as LAVIS]; its decoder predicts text_output + `</s>` (cut on the right to
    max_output_txt_len; LAVIS's blip2_t5 uses 32 for both) from T5's own shift-right of the labels.
    """

    generated_from = 1  # generate's output starts with the decoder start token

    def __init__(self, lm, tokenizer, max_txt_len=32, max_output_txt_len=32, **kwargs):
        super().__init__(lm, tokenizer, "t5", max_txt_len=max_txt_len, max_output_txt_len=max_output_txt_len,
                         **kwargs)
        self.eos_token_id = tokenizer.eos_token_id

    def input_tokens(self, text_input, max_length=None):
        """T5 tokens of text_input (B strings; cut to `max_length` unless None)."""
        return _tokenize(self.lm_tokenizer, text_input, max_length, "left" if self.qformer_text_input else "right")

    def encoder_inputs(self, images, text_input, max_length=None):
        """inputs_embeds [B, Q + L, D] and attention mask [B, Q + L]: the soft prompt (none without images), then
        text_input's tokens (cut to `max_length` unless None)."""
        tokens = self.input_tokens(text_input, max_length).to(self.query_tokens.device)
        return self.with_soft_prompt(images, text_input, tokens)

    def target_tokens(self, text_output, device):
        """Decoder labels [B, L] (text_output + `</s>`, padding -100) and their attention mask."""
        tokens = _tokenize(self.lm_tokenizer, text_output, self.max_output_txt_len, "right").to(device)
        return tokens.input_ids.masked_fill(tokens.attention_mask == 0, -100), tokens.attention_mask

    def decoder_logits(self, images, text_input, labels, decoder_mask):
        """Decoder logits [B, L, vocab] in fp32 for `labels` [B, L] given the images and text_input."""
        embeds, mask = self.encoder_inputs(images, text_input, self.max_txt_len)
        return self.t5_model(inputs_embeds=embeds, attention_mask=mask,
                             decoder_input_ids=self.t5_model._shift_right(labels),
                             decoder_attention_mask=decoder_mask).logits.float()

    def forward(self, images, text_input, text_output):
        """{"loss": cross-entropy of text_output given the images and text_input (B strings each), averaged over
        the labelled tokens of the global batch}."""
        labels, decoder_mask = self.target_tokens(text_output, images.device)
        return {"loss": token_mean_loss(self.decoder_logits(images, text_input, labels, decoder_mask), labels)}

    def generation_inputs(self, images, prompts):
        return self.encoder_inputs(images, prompts)


def token_mean_loss(logits, labels):
    """Cross-entropy of logits [..., V] (fp32) against labels [...] (-100: none), the mean over the labelled
    tokens of the global batch, as in the stage-1 ITG loss: one process or many, the same gradient."""
    targets = labels.flatten()
    global_tokens = all_reduce_sum((targets != -100).sum()).clamp(min=1)
    loss_sum = F.cross_entropy(logits.flatten(0, -2), targets, reduction="sum")
    return loss_sum * get_world_size() / global_tokens


def _tokenize(tokenizer, texts, max_length, truncation_side, **kwargs):
    """tokenizer(texts) right-padded to the longest (whatever the tokenizer's default: LLaMA's pads on the left),
    cut to `max_length` tokens (None: not cut) on `truncation_side` (which transformers only takes as the
    tokenizer's attribute)."""
    tokenizer.truncation_side = truncation_side
    return tokenizer(list(texts), padding="longest", padding_side="right", truncation=max_length is not None,
                     max_length=max_length, return_tensors="pt", **kwargs)


def _single_token_id(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise InputError(f"the language model's tokenizer encodes the end of text {text!r} as {ids}; it must be one "
                         "token (set end_of_text to one)")
    return ids[0]


def _drop_frozen_weights(module, state_dict, prefix, local_metadata):
    for key in module.left_out([k[len(prefix):] for k in state_dict if k.startswith(prefix)]):
        del state_dict[prefix + key]


def _allow_missing_frozen_weights(module, incompatible_keys):
    missing = incompatible_keys.missing_keys
    left_out = set(module.left_out(missing))
    missing[:] = [k for k in missing if k not in left_out]


# ------------------------------------------------------------------------------------------ language models

def load_causal_lm(name_or_dir, precision="fp16"):
    """(AutoModelForCausalLM with weights in `precision`, its tokenizer) from a hub name (facebook/opt-2.7b,
    lmsys/vicuna-7b-v1.1) or a local directory in transformers' format."""
    return _load(AutoModelForCausalLM, name_or_dir, precision)


def load_t5(name_or_dir, precision="bf16", dense_act_fn="gelu"):
    """(T5ForConditionalGeneration with weights in `precision`, its tokenizer) from a hub name (google/flan-t5-xl)
    or a local directory. bf16 by default: Flan-T5 overflows in fp16 (LAVIS casts T5 to bf16).

    `dense_act_fn` "gelu" (exact) replaces Flan-T5's "gelu_new" (tanh approximation) in the gated FFN, as LAVIS
    does on every T5 it loads: its BLIP-2 T5 checkpoints were trained so, and transformers' converted BLIP-2 T5
    configs carry "gelu" too. None keeps the directory's own."""
    return _load(T5ForConditionalGeneration, name_or_dir, precision,
                 {} if dense_act_fn is None else {"dense_act_fn": dense_act_fn})


def _load(model_class, name_or_dir, precision, overrides=None):
    """(model_class from `name_or_dir` in `precision`, its tokenizer); a transformers BLIP-2 / InstructBLIP
    directory gives its language model (its text_config and `language_model.*` weights) and its tokenizer."""
    name_or_dir = local_dir_or_hub_id(name_or_dir, "model.lm")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_dir)
        config = AutoConfig.from_pretrained(name_or_dir)
        blip2 = hasattr(config, "qformer_config")  # its other weights (vision_model.*, qformer.*) are not read here
        config = config.text_config if blip2 else config
        for key, value in (overrides or {}).items():
            setattr(config, key, value)
        model = model_class.from_pretrained(name_or_dir, config=config, dtype=DTYPES[precision],
                                            key_mapping={r"^language_model\.": ""} if blip2 else None)
    except OSError as e:
        raise InputError(f"cannot load the language model '{name_or_dir}' ({e}). Offline, run `hf download "
                         f"{name_or_dir} --local-dir /path/to/lm` on a machine with internet and set model.lm to "
                         "that directory") from None
    return model, tokenizer


# ------------------------------------------------------------------------------------------------------ LoRA

def add_lora(model, r=8, lora_alpha=16, lora_dropout=0.05, target_modules=None):
    """Wrap the frozen LM of `model` in peft LoRA adapters (in place; returns `model`): only the adapters (fp32) and
    the usual trainable parts train, and state_dict() holds the adapters but not the LM. `target_modules` None takes
    peft's default for the architecture (q_proj, v_proj for OPT and LLaMA; q, v for T5). With lm_dropout False the
    adapters' dropout is off too (the LM stays in eval mode)."""
    config = LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                        target_modules=None if target_modules is None else list(target_modules))
    setattr(model, f"{model.lm_name}_model", get_peft_model(model.language_model, config))
    return model.train(model.training)


def merge_lora(model):
    """Merge the LoRA adapters into the LM's weights (peft's merge_and_unload; in place, for export). The LM no
    longer equals its files, so from now on state_dict() holds all of it."""
    if not isinstance(model.language_model, PeftModel):
        raise InputError("the model has no LoRA adapters to merge")
    setattr(model, f"{model.lm_name}_model", model.language_model.merge_and_unload())
    model.lm_in_state_dict = True
    return model


# ------------------------------------------------------------------------------------------------ checkpoints

def load_state(model, checkpoint, source, load_lm=False):
    """Load a checkpoint dict (`{"model": state_dict, ...}` or a state dict) read from `source` into `model`:
    LAVIS's layouts (blip2_opt, blip2_t5, blip2_t5_instruct, blip2_vicuna_instruct: `blip2_pretrained_opt2.7b.pth`,
    `instruct_blip_vicuna7b_trimmed.pth`, ...) and this project's checkpoints; a stage-1 checkpoint (LAVIS's
    `blip2_pretrained.pth` or ours), whose heads (and without the instruction the Q-Former's text side) are
    dropped and after which the projection keeps its initialisation; or a transformers
    Blip2ForConditionalGeneration / InstructBlipForConditionalGeneration state dict (read_transformers).

    The LM's weights in the file are not used (the LM comes from its own files) unless `load_lm`, after which
    state_dict() holds them. LoRA adapters the file lacks keep their initialisation. Image-encoder weights in the
    file set `model.vit_source`. Every problem is an InputError naming `source`. Returns the model's keys left at
    their initialisation."""
    state = checkpoint.get("model", checkpoint)
    refuse_other_families(state, source, ("stage1", "stage2", "hf_generation", "hf_retrieval"), "a stage-2 model "
                          "loads BLIP-2 stage-1 or stage-2 checkpoints (LAVIS's, transformers', this project's)")
    if any(k.startswith(TRANSFORMERS_PREFIXES) for k in state):
        state = hf_to_lavis(state, model.lm_name)
    other_lm = [name for name in LM_NAMES if name != model.lm_name and f"{name}_proj.weight" in state]
    if other_lm:
        raise InputError(f"{source} is a stage-2 checkpoint of another language model ({other_lm[0]}_proj); this "
                         f"model.arch projects into {model.lm_name}_proj: set model.arch (and model.lm) as it was "
                         "trained")
    vision = {k: v for k, v in state.items() if k.startswith("visual_encoder.")}
    if vision:
        load_vision_weights(model.visual_encoder, vision, source)
        model.vit_source = source
    elif model.visual_encoder.frozen and model.vit_source is None:
        recorded = checkpoint.get("config", {}).get("model", {})
        sources = {k: recorded[k] for k in ("vit_pretrained", "pretrained") if recorded.get(k)}
        raise InputError(f"{source} holds no image-encoder weights and the config names no file for them; set "
                         f"model.vit_pretrained or model.pretrained as in training ({sources or 'not recorded'})")

    model.lm_in_state_dict = model.lm_in_state_dict or load_lm
    ours = {k: v for k, v in model.state_dict().items() if not k.startswith("visual_encoder.")
            and not k.endswith("position_ids")}
    # A stage-1 checkpoint's Q-Former text side is dropped when the model has none; anyone else's is a mismatch
    # (an InstructBLIP checkpoint in a model without the instruction).
    from_stage1 = any(re.match(STAGE1_HEADS, k) for k in state)
    stage1_only = re.compile(STAGE1_HEADS if model.qformer_text_input or not from_stage1
                             else f"{STAGE1_HEADS}|{QFORMER_TEXT}")
    frozen_lm = [k for k in state if k.startswith(f"{model.lm_name}_model.") and k not in ours and "lora_" not in k]
    dropped = set(frozen_lm + [k for k in state if stage1_only.match(k)])
    theirs = {k: v for k, v in state.items() if not k.startswith("visual_encoder.") and k not in dropped
              and not k.endswith("position_ids")}
    problems = [f"unexpected {k}" for k in theirs if k not in ours]
    problems += [f"{k} is {tuple(v.shape)}, the model's {tuple(ours[k].shape)}" for k, v in theirs.items()
                 if k in ours and v.shape != ours[k].shape]
    projection = f"{model.lm_name}_proj."
    # Tied weights (T5's embeddings and LM head) are one tensor under several names; files hold one of them.
    loaded = {ours[k].data_ptr() for k in theirs if k in ours}
    absent = [k for k in ours if k not in theirs and ours[k].data_ptr() not in loaded]
    problems += [f"missing {k}" for k in absent if not (from_stage1 and k.startswith(projection)) and "lora_" not in k]
    if problems:
        raise InputError(f"{source} does not fit the model ({len(problems)} problems: {'; '.join(problems[:4])}). "
                         "Check model.vision, model.qformer, model.num_query_tokens, the language model, the "
                         "instruction-aware Q-Former (qformer_text_input) and LoRA")
    if dropped:
        log(f"{source}: {len(dropped)} tensors the model does not use are ignored "
            f"({', '.join(sorted({k.split('.')[0] for k in dropped}))})")
    if from_stage1:
        log(f"{source} is a stage-1 checkpoint: {projection[:-1]} keeps its initialisation")
    if any("lora_" in k for k in absent):
        log(f"{source} has no LoRA adapters: they keep their initialisation")
    model.load_state_dict(theirs, strict=False)
    return absent


def to_transformers(state, lm_state=None):
    """A LAVIS-layout stage-2 state dict of any variant (`{opt,t5,llm}_proj`; the Q-Former's word embeddings mean
    InstructBLIP) and the LM's own state dict -> transformers' Blip2ForConditionalGeneration or
    InstructBlipForConditionalGeneration keys. `position_ids` (a constant) has no place there."""
    lm = lm_name_of(state)
    instruct = "Qformer.bert.embeddings.word_embeddings.weight" in state
    return lavis_to_hf({**state, **{f"{lm}_model.{k}": v for k, v in (lm_state or {}).items()}}, instruct)


def from_transformers(hf, lm_name):
    """Inverse of `to_transformers` for a model whose LAVIS names are `{lm_name}_*`: (LAVIS-layout state dict, the
    LM's state dict)."""
    state = hf_to_lavis(hf, lm_name)
    prefix = f"{lm_name}_model."
    lm = {k[len(prefix):]: state.pop(k) for k in list(state) if k.startswith(prefix)}
    return state, lm


def lm_name_of(state):
    """LAVIS's name of the LM of a LAVIS-layout stage-2 state dict (one of LM_NAMES), from its projection."""
    for name in LM_NAMES:
        if f"{name}_proj.weight" in state:
            return name
    raise InputError(f"the state dict has no language-model projection ({', '.join(f'{n}_proj' for n in LM_NAMES)})")


def lm_name_of_transformers(hf):
    """LAVIS's name of the LM of a transformers BLIP-2 state dict, from its language_model.* keys: t5 (an
    encoder-decoder), opt (OPT's model.decoder), llm (any other decoder)."""
    if any(k.startswith("language_model.encoder.") for k in hf):
        return "t5"
    return "opt" if any(k.startswith("language_model.model.decoder.") for k in hf) else "llm"


def read_transformers(directory):
    """(config dict, state dict) of a transformers model directory: `config.json` and `model.safetensors`, or the
    shards that `model.safetensors.index.json` lists."""
    config_path, single = os.path.join(directory, "config.json"), os.path.join(directory, "model.safetensors")
    index = os.path.join(directory, "model.safetensors.index.json")
    if not os.path.isfile(config_path):
        raise InputError(f"{directory} has no config.json: not a transformers model directory")
    if os.path.isfile(single):
        files = [single]
    elif os.path.isfile(index):
        with open(index) as f:
            files = [os.path.join(directory, name) for name in sorted(set(json.load(f)["weight_map"].values()))]
    else:
        raise InputError(f"{directory} has neither model.safetensors nor model.safetensors.index.json (only "
                         "safetensors weights are read)")
    state = {}
    for path in files:
        if not os.path.isfile(path):
            raise InputError(f"{index} lists {os.path.basename(path)}, which is not in {directory}")
        state.update(load_file(path))
    with open(config_path) as f:
        return json.load(f), state


def transformers_config(model, image_token_id):
    """Blip2Config or InstructBlipConfig of `model`: its EVA ViT, Q-Former, the LM's own config, the number of
    queries and the LM token whose positions the soft prompt takes (`image_token_id`)."""
    encoder = model.visual_encoder
    if not isinstance(encoder, EvaViT):
        raise InputError("transformers' BLIP-2 has no CLIP ViT-L image encoder: only models with an EVA ViT export")
    block = encoder.blocks[0]
    vision = dict(hidden_size=encoder.num_features, intermediate_size=block.mlp.fc1.out_features,
                  num_hidden_layers=len(encoder.blocks), num_attention_heads=block.attn.num_heads,
                  image_size=encoder.patch_embed.img_size[0], patch_size=encoder.patch_embed.patch_size[0],
                  layer_norm_eps=block.norm1.eps, qkv_bias=True)
    q = model.Qformer.bert.config
    same_names = ["hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_dropout_prob",
                  "attention_probs_dropout_prob", "max_position_embeddings", "layer_norm_eps"]
    if model.qformer_text_input:  # transformers' BLIP-2 Q-Former has no word embeddings
        same_names.append("vocab_size")
    qformer = {name: getattr(q, name) for name in same_names}
    qformer.update(cross_attention_frequency=q.cross_attention_freq, encoder_hidden_size=q.encoder_width)
    config_class = InstructBlipConfig if model.qformer_text_input else Blip2Config
    return config_class(vision_config=vision, qformer_config=qformer, text_config=model.language_model.config.to_dict(),
                        num_query_tokens=model.query_tokens.shape[1], image_token_index=image_token_id)


def save_transformers(model, directory, dtype=torch.float32):
    """Write `model` (image encoder and LM included, in `dtype`) as a transformers directory (config.json and
    safetensors weights, save_pretrained) that Blip2ForConditionalGeneration.from_pretrained (InstructBLIP:
    InstructBlipForConditionalGeneration) loads.

    transformers puts the soft prompt at the positions of an image token in input_ids: its id is the first one past
    the tokenizer's vocabulary, a spare row of the LM's embeddings where there is one (as in the released OPT and
    Flan-T5); otherwise the exported LM gets one more row, initialised by transformers. transformers' ln_vision
    uses the image encoder's LayerNorm eps (1e-6), LAVIS's 1e-5: a model with ln_vision_eps 1e-5 exports with 1e-6."""
    if isinstance(model.language_model, PeftModel):
        raise InputError("transformers' layout has no place for LoRA adapters: merge them first (merge_lora)")
    vocab_rows = model.language_model.get_input_embeddings().num_embeddings
    image_token_id = len(model.lm_tokenizer)
    config = transformers_config(model, image_token_id)
    if model.ln_vision.eps != config.vision_config.layer_norm_eps:
        log(f"transformers' ln_vision has eps {config.vision_config.layer_norm_eps}, this model's "
            f"{model.ln_vision.eps}: the exported model's image features differ by that much")
    vision = {f"visual_encoder.{k}": v for k, v in model.visual_encoder.state_dict().items()}
    state = to_transformers({**model.state_dict(), **vision}, model.language_model.state_dict())
    model_class = InstructBlipForConditionalGeneration if model.qformer_text_input else Blip2ForConditionalGeneration
    with torch.device("meta"):
        hf = model_class(config)
    hf.load_state_dict(state, strict=True, assign=True)
    if image_token_id >= vocab_rows:
        hf.language_model.resize_token_embeddings(image_token_id + 1)
        log(f"the exported language model has one more embedding row, for the image token {image_token_id}")
    hf.to(dtype).save_pretrained(directory)
