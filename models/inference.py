"""Inference with this repository's models: the counterpart of LAVIS's `load_model_and_preprocess`.

    from models.inference import caption_images, image_text_scores, load_model_and_preprocess, predict_nlvr

    model, image_processor, text_processor = load_model_and_preprocess(
        "configs/blip2_caption_coco.yaml", "blip2_caption_opt2.7b.pth", device="cuda")
    caption_images(model, image_processor, text_processor, ["cat.jpg", "dog.jpg"], num_beams=5)

The config is any of the repository's YAML files (only its `model:` section is read, and `model.arch` picks the
model): `blip_nlvr` (predict_nlvr), `blip2_qformer` (image_text_scores, and captions from its ITG decoder) or
a stage-2 `blip2_opt`, `blip2_llm`, `blip2_t5` or `blip2_*_instruct` (caption_images, answer_questions). Images
are file paths or PIL images, preprocessed as in evaluation.
"""

import torch
from PIL import Image

from data.caption import prompted
from data.transforms import eval_transform
from data.utils import pre_caption
from data.vqa import DEFAULT_PROMPT, pre_question
from models import blip2_lm, blip2_qformer, blip_nlvr
from models.blip2_lm import Blip2LM, Blip2LMConfig
from models.blip2_qformer import Blip2Qformer, Blip2QformerConfig, decode_captions, itc_similarity
from models.blip_nlvr import BlipNLVR, BlipNLVRConfig
from utils import InputError, config_section, evaluation_weights

# Caption cleaning and text length of the original evaluations: NLVR2 40 words (tokens up to the text encoder's
# positions, as train_nlvr.py); COCO/Flickr retrieval 30 words, 35 tokens.
MAX_WORDS, MAX_TOKENS = {"blip_nlvr": 40, "blip2_qformer": 30}, {"blip2_qformer": 35}


class ImageProcessor:
    """Image files or PIL images -> the model's evaluation input [B, 3, S, S] on `device`."""

    def __init__(self, image_size, device):
        self.transform, self.device = eval_transform(image_size), torch.device(device)

    def __call__(self, images):
        return torch.stack([self.transform(_open(image)) for image in images]).to(self.device)


class TextProcessor:
    """Strings -> (input_ids, attention_mask) [B, L] on `device`, after BLIP's caption cleaning (pre_caption)."""

    def __init__(self, tokenizer, max_words, max_length, device):
        self.tokenizer, self.max_words, self.max_length = tokenizer, max_words, max_length
        self.device = torch.device(device)

    def __call__(self, texts):
        tokens = self.tokenizer([pre_caption(text, self.max_words) for text in texts], padding="longest",
                                truncation=True, max_length=self.max_length, return_tensors="pt")
        return tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)


def _open(image):
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    try:
        return Image.open(image).convert("RGB")
    except (FileNotFoundError, OSError) as e:
        raise InputError(f"cannot read image {image}: {e}") from None


def load_model_and_preprocess(config, checkpoint=None, device="cpu"):
    """(model in eval mode on `device`, ImageProcessor, TextProcessor) of the `model:` section of the YAML file
    `config`, with the weights of `checkpoint` (a path or URL; default: model.pretrained)."""
    cfg = config_section(config, "model", BlipNLVRConfig | Blip2QformerConfig | Blip2LMConfig)
    weights = str(checkpoint) if checkpoint else cfg.pretrained
    if weights is None:
        raise InputError(f"{config}: no weights to load; pass a checkpoint or set model.pretrained")
    model, tokenizer = load_model(cfg, weights, unused=("temp",))  # no caption or score uses it
    model.to(device).eval()
    max_tokens = (model.text_encoder.config.max_position_embeddings if cfg.arch == "blip_nlvr"
                  else MAX_TOKENS.get(cfg.arch, model.max_txt_len if isinstance(model, Blip2LM) else None))
    return model, ImageProcessor(cfg.image_size, device), TextProcessor(tokenizer, MAX_WORDS.get(cfg.arch, 30),
                                                                         max_tokens, device)


MODELS = {"blip_nlvr": blip_nlvr, "blip2_qformer": blip2_qformer, **{arch: blip2_lm for arch in blip2_lm.ARCHS}}


def load_model(cfg, checkpoint, unused=()):
    """(model, tokenizer) of a BlipNLVRConfig, Blip2QformerConfig or Blip2LMConfig: its module's create_model
    (the architecture and the frozen parts from the files the config names), then the weights of `checkpoint`,
    which must leave none of them at its initialisation but for keys starting with `unused`."""
    module = MODELS[cfg.arch]
    model, tokenizer = module.create_model(cfg)
    load_for_evaluation(module.load_checkpoint, model, checkpoint, unused)
    return model, tokenizer


def load_for_evaluation(load_checkpoint, model, checkpoint, unused=()):
    """`load_checkpoint(model, checkpoint)` (which returns the keys it left at their initialisation), refused when
    any but those starting with `unused` (parts the evaluation does not run) are left: evaluating random weights
    would give numbers, not an error."""
    left = [key for key in load_checkpoint(model, checkpoint) if not key.startswith(tuple(unused))]
    if left:
        parts = sorted({key.rsplit(".", 1)[0] for key in left})
        raise InputError(f"{checkpoint} leaves {len(left)} tensors of this model at their initialisation "
                         f"({', '.join(parts[:6])}): it is a checkpoint to train from, not to evaluate (e.g. a "
                         "stage-1 checkpoint for a stage-2 model, BLIP's pre-trained one for NLVR); evaluate a "
                         "checkpoint of this model")
    return model


def evaluation_model(run, unused=()):
    """(model in eval mode on the run's device, tokenizer) of an evaluation script's run: its config's model with
    the weights of utils.evaluation_weights (--checkpoint, else model.pretrained); see load_model."""
    model, tokenizer = load_model(run.cfg.model, evaluation_weights(run), unused)
    return model.to(run.device).eval(), tokenizer


@torch.no_grad()
def caption_images(model, image_processor, text_processor, images, **options):
    """One caption per image with a stage-2 model (its prompt not included) or a Blip2Qformer's ITG decoder;
    `options` go to beam search (num_beams, max_new_tokens, min_new_tokens, repetition_penalty, length_penalty,
    prompt for a stage-2 model, ...)."""
    pixels = image_processor(images)
    if isinstance(model, Blip2LM):
        return model.caption(pixels, **options)
    if isinstance(model, Blip2Qformer):
        return decode_captions(text_processor.tokenizer, model.generate(pixels, **options))
    raise InputError(f"{type(model).__name__} does not caption; use a stage-2 or blip2_qformer config")


@torch.no_grad()
def answer_questions(model, image_processor, images, questions, prompt=DEFAULT_PROMPT, **options):
    """One answer per (image, question) with a stage-2 model: the question cleaned as in VQA evaluation and placed
    in `prompt`; `options` as eval_vqa.py's (default: BLIP-2's 5 beams, 1 to 10 new tokens, length penalty -1)."""
    if not isinstance(model, Blip2LM):
        raise InputError(f"{type(model).__name__} does not answer questions; use a stage-2 config")
    options = {"num_beams": 5, "max_new_tokens": 10, "min_new_tokens": 1, "length_penalty": -1.0, **options}
    prompts = [prompted(prompt, pre_question(question)) for question in questions]
    return model.caption(image_processor(images), prompt=prompts, **options)


@torch.no_grad()
def image_text_scores(model, image_processor, text_processor, images, texts, pairs_per_batch=128):
    """Scores of every image with every text, {"itc": [I, T], "itm": [I, T]}: the ITC cosine similarity (max over
    queries, as retrieval ranks) and the ITM probability that the pair matches."""
    if not isinstance(model, Blip2Qformer):
        raise InputError(f"{type(model).__name__} has no ITC/ITM heads; use a blip2_qformer config")
    image_embeds = model.image_embeddings(image_processor(images))
    input_ids, attention_mask = text_processor(texts)
    itc = itc_similarity(model.image_features(image_embeds), model.text_features(input_ids, attention_mask))
    image_index, text_index = (index.flatten() for index in torch.meshgrid(
        torch.arange(itc.shape[0]), torch.arange(itc.shape[1]), indexing="ij"))
    itm = torch.cat([model.itm_logits(image_embeds[i], input_ids[t], attention_mask[t]).float().softmax(-1)[:, 1]
                     for i, t in zip(image_index.split(pairs_per_batch), text_index.split(pairs_per_batch))])
    itm = itm.view(itc.shape)
    return {"itc": itc.cpu(), "itm": itm.cpu()}


@torch.no_grad()
def predict_nlvr(model, image_processor, text_processor, image0, image1, sentence):
    """Whether `sentence` holds for the image pair: {"true": bool, "probability": P(true)}."""
    if not isinstance(model, BlipNLVR):
        raise InputError(f"{type(model).__name__} does not predict NLVR; use a blip_nlvr config")
    pixels = image_processor([image0, image1])
    input_ids, attention_mask = text_processor([sentence])
    probability = model(pixels[:1], pixels[1:], input_ids, attention_mask).float().softmax(-1)[0, 1].item()
    return {"true": probability > 0.5, "probability": probability}
