"""models/inference.py against independent computations with tiny seeded models saved as checkpoints."""

import json

import pytest
import torch
from PIL import Image

from data.transforms import eval_transform
from data.utils import pre_caption, read_annotation
from models import blip2_lm, blip2_qformer, blip_nlvr
from models.blip2_qformer import decode_captions
from models.inference import caption_images, image_text_scores, load_model_and_preprocess, predict_nlvr
from models.tokenizer import init_tokenizer
from train_demo_lm import build_demo_opt, build_demo_tokenizer
from utils import InputError

SIZE = 32
BEAMS = dict(num_beams=2, max_new_tokens=6, min_new_tokens=1)
VISION = dict(image_size=SIZE, patch_size=16, vision="eva_tiny", vit_precision="fp32", qformer="tiny",
              num_query_tokens=4)


def write_config(path, fields):
    """A YAML config whose `model:` section is `fields`, with data and eval sections the loader must ignore."""
    model = "".join(f"  {k}: {'null' if v is None else v}\n" for k, v in fields.items())
    path.write_text(f"model:\n{model}data:\n  image_root: /nowhere\n  num_workers: 0\neval:\n  batch_size: 4\n"
                    "  num_beams: 3\n")
    return path


def build(module, schema, fields, out):
    """(reference model in eval mode, config path, checkpoint path): `module.create_model` under a fixed seed, its
    2-D non-ViT weights scaled by 3 (spread scores, and weights no fresh initialisation can have), then saved."""
    torch.manual_seed(0)
    model = module.create_model(schema(**fields))[0]
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2 and not name.startswith(("visual_encoder.", "opt_model.")):
                param.mul_(3.0)
    torch.save({"model": model.state_dict()}, out / "model.pth")
    return model.eval(), write_config(out / "config.yaml", fields), str(out / "model.pth")


def load(config, checkpoint):
    torch.manual_seed(123)  # a fresh initialisation differs from the checkpoint
    return load_model_and_preprocess(config, checkpoint)


@pytest.fixture(scope="module")
def qformer(demo_data, tmp_path_factory):
    fields = dict(arch="blip2_qformer", **VISION, bert=None, tokenizer=str(demo_data / "tokenizer"), embed_dim=32)
    ref, config, ckpt = build(blip2_qformer, blip2_qformer.Blip2QformerConfig, fields, tmp_path_factory.mktemp("q"))
    return ref, config, ckpt, load(config, ckpt)


@pytest.fixture(scope="module")
def opt(demo_data, tmp_path_factory):
    opt_dir = tmp_path_factory.mktemp("opt")
    texts = [entry["caption"] + "\n" for entry in read_annotation(str(demo_data / "coco_karpathy_train.json"))]
    tokenizer = build_demo_tokenizer(texts)
    torch.manual_seed(0)
    lm = build_demo_opt(tokenizer, hidden_size=32, num_layers=2, num_heads=2, ffn_dim=64)
    with torch.no_grad():  # larger weights: captions that depend on the image
        for param in lm.parameters():
            param.mul_(10.0 if param.dim() == 2 else 1.0)
    lm.save_pretrained(opt_dir)
    tokenizer.save_pretrained(opt_dir)
    fields = dict(arch="blip2_opt", **VISION, lm=str(opt_dir), lm_precision="fp32")
    ref, config, ckpt = build(blip2_lm, blip2_lm.Blip2LMConfig, fields, tmp_path_factory.mktemp("o"))
    return ref, config, ckpt, load(config, ckpt)


@pytest.fixture(scope="module")
def nlvr(demo_data, tmp_path_factory):
    fields = dict(arch="blip_nlvr", vit="tiny", image_size=SIZE, text_encoder="tiny",
                  tokenizer=str(demo_data / "tokenizer"))
    ref, config, ckpt = build(blip_nlvr, blip_nlvr.BlipNLVRConfig, fields, tmp_path_factory.mktemp("n"))
    # The random model says "true" to everything: shift its "true" logit by the median margin so both answers occur.
    tokenizer = init_tokenizer(str(demo_data / "tokenizer"))
    entries = json.loads((demo_data / "nlvr_dev.json").read_text())[:4]
    probabilities = [nlvr_probability(ref, tokenizer, *(str(demo_data / p) for p in e["images"]), e["sentence"])
                     for e in entries]
    with torch.no_grad():
        ref.cls_head[2].bias[1] -= torch.tensor(probabilities).logit().median()
    torch.save({"model": ref.state_dict()}, ckpt)
    return ref, config, ckpt, load(config, ckpt)


def caption_images_of(demo_data, n=3):
    entries = json.loads((demo_data / "coco_karpathy_test.json").read_text())[:n]
    return [str(demo_data / e["image"]) for e in entries], [e["caption"] for e in entries]


def pixels_of(images):
    return torch.stack([eval_transform(SIZE)(Image.open(p).convert("RGB")) for p in images])


@pytest.mark.parametrize("arch", ["qformer", "opt", "nlvr"])
def test_load_model_and_preprocess(arch, request):
    ref, _, ckpt, (model, image_processor, _) = request.getfixturevalue(arch)
    assert not any(m.training for m in model.modules())
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)["model"]
    # Blip2OPT's state_dict leaves out the image encoder once loaded from a file: compare every tensor.
    loaded = {**dict(model.named_parameters(remove_duplicate=False)),
              **dict(model.named_buffers(remove_duplicate=False))}
    assert set(saved) <= set(loaded)
    vit_keys = {k for k in saved if k.startswith("visual_encoder.")} if arch == "opt" else set()
    assert set(model.state_dict()) == set(saved) - vit_keys
    for key, value in saved.items():
        assert torch.equal(loaded[key], value), key
    if arch == "opt":  # the frozen OPT, absent from the checkpoint, is the one of model.lm
        for key, value in ref.opt_model.state_dict().items():
            assert torch.equal(model.opt_model.state_dict()[key], value), key


def test_image_processor(qformer, demo_data, tmp_path):
    image_processor = qformer[3][1]
    paths = caption_images_of(demo_data)[0]
    odd = tmp_path / "odd.png"  # another size and mode: resized (not cropped) and converted to RGB
    Image.frombytes("L", (50, 40), bytes(range(200)) * 10).save(odd)
    paths.append(str(odd))
    expected = pixels_of(paths)
    assert expected.shape == (4, 3, SIZE, SIZE)
    assert torch.equal(image_processor(paths), expected)
    assert torch.equal(image_processor([Image.open(odd)]), expected[3:])
    assert torch.equal(image_processor([Image.open(paths[0]), paths[1]]), expected[:2])


@torch.no_grad()
def test_image_text_scores(qformer, demo_data):
    ref, _, _, (model, image_processor, text_processor) = qformer
    tokenizer = init_tokenizer(str(demo_data / "tokenizer"), enc_token=False)
    images, captions = caption_images_of(demo_data)
    long_text = "A Red Square, a blue circle; a yellow triangle (top-left)! " * 6  # > 30 words, > 35 tokens
    words_33 = "a red square " * 11  # cut to 30 words, not by the 35 tokens
    texts = [captions[0][0], captions[1][1], "Two GREEN shapes: one left... one right!", words_33, long_text]
    expected = {"itc": torch.zeros(3, 5), "itm": torch.zeros(3, 5)}
    for i, path in enumerate(images):
        image_embeds = ref.image_embeddings(pixels_of([path]))
        queries = ref.image_features(image_embeds)[0]
        for t, text in enumerate(texts):
            tokens = tokenizer(pre_caption(text, 30), truncation=True, max_length=35, return_tensors="pt")
            text_feat = ref.text_features(tokens.input_ids, tokens.attention_mask)[0]
            expected["itc"][i, t] = (queries @ text_feat).max()
            logits = ref.itm_logits(image_embeds, tokens.input_ids, tokens.attention_mask)
            expected["itm"][i, t] = logits.softmax(-1)[0, 1]
    assert len(tokenizer(pre_caption(long_text, 30)).input_ids) > 35  # truncation is exercised
    scores = image_text_scores(model, image_processor, text_processor, images, texts)
    for key in ("itc", "itm"):
        assert scores[key].shape == (3, 5)
        torch.testing.assert_close(scores[key], expected[key], atol=1e-5, rtol=0)
        assert expected[key].std() > 1e-3  # distinct scores: a mix-up of pairs would show
    one = image_text_scores(model, image_processor, text_processor, images, texts, pairs_per_batch=1)
    many = image_text_scores(model, image_processor, text_processor, images, texts, pairs_per_batch=128)
    for key in ("itc", "itm"):
        torch.testing.assert_close(one[key], many[key], atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", ["qformer", "opt"])
def test_caption_images(arch, request, demo_data):
    ref, _, _, (model, image_processor, text_processor) = request.getfixturevalue(arch)
    images = caption_images_of(demo_data)[0]
    with torch.no_grad():
        if arch == "opt":
            expected = ref.caption(pixels_of(images), **BEAMS)
        else:
            tokenizer = init_tokenizer(str(demo_data / "tokenizer"), enc_token=False)
            expected = decode_captions(tokenizer, ref.generate(pixels_of(images), **BEAMS))
    captions = caption_images(model, image_processor, text_processor, images, **BEAMS)
    assert isinstance(captions, list) and len(captions) == 3 and all(isinstance(c, str) for c in captions)
    assert captions == expected and len(set(expected)) > 1  # captions differ between images
    # Each image is captioned from its own pixels: a PIL image in the list gives its path's caption.
    assert caption_images(model, image_processor, text_processor, [Image.open(images[2])], **BEAMS) == expected[2:]


def nlvr_probability(ref, tokenizer, image0, image1, sentence, max_length=None):
    tokens = tokenizer([pre_caption(sentence, 40)], truncation=max_length is not None, max_length=max_length,
                       return_tensors="pt")
    with torch.no_grad():
        logits = ref(pixels_of([image0]), pixels_of([image1]), tokens.input_ids, tokens.attention_mask)
    return logits.softmax(-1)[0, 1].item()


def test_predict_nlvr(nlvr, demo_data):
    ref, _, _, (model, image_processor, text_processor) = nlvr
    tokenizer = init_tokenizer(str(demo_data / "tokenizer"))
    entries = json.loads((demo_data / "nlvr_dev.json").read_text())[:4]
    entries[3]["sentence"] = "The LEFT image has a red shape; " * 7  # 49 words, cut to 40 (42 tokens)
    probabilities = []
    for entry in entries:
        image0, image1 = (str(demo_data / p) for p in entry["images"])
        expected = nlvr_probability(ref, tokenizer, image0, image1, entry["sentence"])
        result = predict_nlvr(model, image_processor, text_processor, image0, image1, entry["sentence"])
        assert set(result) == {"true", "probability"} and isinstance(result["true"], bool)
        assert result["probability"] == pytest.approx(expected, abs=1e-5)
        assert result["true"] == (result["probability"] > 0.5)
        swapped = predict_nlvr(model, image_processor, text_processor, image1, image0, entry["sentence"])
        assert swapped["probability"] == pytest.approx(nlvr_probability(ref, tokenizer, image1, image0,
                                                                        entry["sentence"]), abs=1e-5)
        assert abs(swapped["probability"] - result["probability"]) > 1e-4  # the image order matters
        probabilities.append(result["probability"])
    assert min(probabilities) < 0.5 < max(probabilities)  # both answers occur


def test_predict_nlvr_long_sentence(nlvr, demo_data):
    """A sentence of 20 words but 142 WordPiece tokens exceeds the tiny text encoder's 64 positions: it is cut to
    them, as train_nlvr.py cuts it (max_position_embeddings), not passed on to fail in the position embedding."""
    ref, _, _, (model, image_processor, text_processor) = nlvr
    tokenizer = init_tokenizer(str(demo_data / "tokenizer"))
    entry = json.loads((demo_data / "nlvr_dev.json").read_text())[0]
    image0, image1 = (str(demo_data / p) for p in entry["images"])
    sentence = "red,blue,left,right " * 20
    max_positions = ref.text_encoder.config.max_position_embeddings
    assert len(tokenizer(pre_caption(sentence, 40)).input_ids) > max_positions
    expected = nlvr_probability(ref, tokenizer, image0, image1, sentence, max_length=max_positions)
    result = predict_nlvr(model, image_processor, text_processor, image0, image1, sentence)
    assert result["probability"] == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("model_section, message", [
    ("  vit: tiny\n  image_size: 32\n", "model.arch"),
    ("  arch: blip_vqa\n  vit: tiny\n", "blip_vqa"),
])
def test_config_errors(tmp_path, model_section, message):
    config = tmp_path / "bad.yaml"
    config.write_text(f"model:\n{model_section}data:\n  image_root: x\n")
    with pytest.raises(InputError, match=message) as error:
        load_model_and_preprocess(config, str(tmp_path / "unused.pth"))
    assert "model.arch" in str(error.value)


def test_no_weights(tmp_path, demo_data):
    config = write_config(tmp_path / "c.yaml", dict(arch="blip_nlvr", vit="tiny", image_size=SIZE,
                                                    text_encoder="tiny", tokenizer=str(demo_data / "tokenizer")))
    with pytest.raises(InputError, match="pretrained"):
        load_model_and_preprocess(config)


def test_wrong_model_errors(qformer, nlvr, demo_data):
    q_model, q_image, q_text = qformer[3]
    n_model, n_image, n_text = nlvr[3]
    images = caption_images_of(demo_data)[0]
    with pytest.raises(InputError, match="BlipNLVR.*blip2_qformer"):
        image_text_scores(n_model, n_image, n_text, images, ["a red square"])
    with pytest.raises(InputError, match="BlipNLVR does not caption; use a stage-2 or blip2_qformer config"):
        caption_images(n_model, n_image, n_text, images)
    with pytest.raises(InputError, match="Blip2Qformer.*blip_nlvr"):
        predict_nlvr(q_model, q_image, q_text, images[0], images[1], "a red square")


def test_missing_image(qformer, demo_data, tmp_path):
    model, image_processor, text_processor = qformer[3]
    missing = str(tmp_path / "no_such_image.png")
    images = caption_images_of(demo_data)[0][:1] + [missing]
    with pytest.raises(InputError, match="no_such_image") as error:
        caption_images(model, image_processor, text_processor, images, **BEAMS)
    assert missing in str(error.value)
    with pytest.raises(InputError) as error:
        image_text_scores(model, image_processor, text_processor, images, ["a red square"])
    assert missing in str(error.value)
