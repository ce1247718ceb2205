"""data/feature_cache.py: cached rows against the encoder run on each image, the wrapped dataset, stage-1/2 losses
from cached tokens, reuse and rebuild, config errors, the stage-1 trainer with a cache, and a two-process build.

Rows are compared bit for bit with the encoder run on the same batches of images: fp32 matmuls on CPU round
differently with the batch size (about 1e-7), so a batch of other images may change the last bit of a row.
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import train_blip2_stage1
import train_blip2_stage2
from data.caption import CaptionDataset, CaptionSource
from data.feature_cache import META, TOKENS, FeatureCacheDataset, build_feature_cache
from data.transforms import eval_transform
from models.blip2_qformer import Blip2Qformer
from tests.conftest import ROOT, read_log, run_script
from tests.reference_lm import opt_tokenizer
from tests.stage2_ddp import INSTRUCTIONS, TEXTS, tiny_stage2_model
from tests.test_train_blip2_stage2 import stage2_config
from utils import InputError

TORCHRUN = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
CPU = torch.device("cpu")


def tiny_model(vit_precision="fp32"):
    torch.manual_seed(0)
    return Blip2Qformer({"bos": 40, "pad": 0, "eos": 3}, vision="eva_tiny", image_size=32, patch_size=16,
                        qformer="tiny", vocab_size=41, num_query_tokens=4, vit_precision=vit_precision).eval()


def caption_set(demo_data, ann_file=None):
    ann_file = ann_file or demo_data / "coco_karpathy_train.json"
    return CaptionDataset([CaptionSource(str(ann_file), str(demo_data))], eval_transform(32))


def build(model, dataset, cache_dir, batch_size=1):
    return build_feature_cache(model.visual_encoder, dataset, str(cache_dir), 32, batch_size, CPU, num_workers=0)


def distinct_images(demo_data):
    """The training images in first-seen order, read from the annotation file, with the eval transform."""
    entries = json.loads((demo_data / "coco_karpathy_train.json").read_text())
    paths = dict.fromkeys(os.path.join(demo_data, entry["image"]) for entry in entries)
    return torch.stack([eval_transform(32)(Image.open(path).convert("RGB")) for path in paths])


def stored_rows(cache_dir, dtype):
    """tokens.bin read as [num_images, N, Dv] of `dtype` from meta.json's shape."""
    meta = json.loads((Path(cache_dir) / META).read_text())
    raw = torch.from_numpy(np.fromfile(Path(cache_dir) / TOKENS, dtype=np.uint8))
    return raw.view(dtype).reshape(meta["shape"])


def demo_config(directory, data_dir):
    """configs/blip2_stage1_demo.yaml with its demo_data paths pointing at `data_dir`."""
    path = Path(directory) / "stage1_demo.yaml"
    path.write_text((ROOT / "configs/blip2_stage1_demo.yaml").read_text().replace("demo_data", str(data_dir)))
    return path


def train(config, out, *options, trainer=train_blip2_stage1):
    trainer.main(["--config", str(config), "--output_dir", str(out), "--device", "cpu", "--options", *options])


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
@pytest.mark.parametrize("batch_size", [1, 5])
def test_every_row_is_the_encoder_output_of_its_image(demo_data, tmp_path, precision, dtype, batch_size):
    model = tiny_model(precision)
    meta = build(model, caption_set(demo_data), tmp_path, batch_size)
    images = distinct_images(demo_data)
    expected = torch.cat([model.visual_encoder(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])
    assert expected.dtype == dtype and meta["shape"] == list(expected.shape) and meta["dtype"] == str(dtype)[6:]
    assert torch.equal(stored_rows(tmp_path, dtype), expected)


def test_wrapped_items_are_the_caption_sets_with_tokens_for_images(demo_data, tmp_path):
    model, dataset = tiny_model("bf16"), caption_set(demo_data)
    build(model, dataset, tmp_path)
    cached = FeatureCacheDataset(dataset, str(tmp_path))
    assert len(cached) == len(dataset) and len(set(entry["image_id"] for entry in dataset.entries)) < len(dataset)
    for index in range(len(dataset)):
        image, *texts = dataset[index]
        tokens, *cached_texts = cached[index]
        assert cached_texts == texts and texts[0] == ""  # (text_input, caption, image_id)
        assert torch.equal(tokens, model.visual_encoder(image[None])[0])
    # What a training loader with a worker process reads.
    loader = torch.utils.data.DataLoader(cached, batch_size=len(cached), num_workers=1)
    tokens, _, captions, image_ids = next(iter(loader))
    assert torch.equal(tokens, torch.stack([cached[i][0] for i in range(len(cached))]))
    assert list(captions) == [entry["caption"] for entry in dataset.entries]
    assert image_ids.tolist() == [entry["image_id"] for entry in dataset.entries]


def test_stage1_losses_and_gradients_from_cached_tokens_equal_those_from_images(demo_data, tmp_path):
    model, dataset, batch = tiny_model(), caption_set(demo_data), 6
    build(model, dataset, tmp_path, batch_size=batch)  # its first batch: images 0..5, as the image batch below
    cached = FeatureCacheDataset(dataset, str(tmp_path))
    first_caption = [[e["image_id"] for e in dataset.entries].index(image_id) for image_id in range(batch)]
    images = torch.stack([dataset[i][0] for i in first_caption])
    tokens = torch.stack([cached[i][0] for i in first_caption])
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 40, (batch, 10), generator=generator)
    ids[:, 0] = 2
    mask = torch.ones_like(ids)
    ids[::2, 6:], mask[::2, 6:] = 0, 0
    image_ids = torch.arange(batch)

    def losses_and_grads(inputs):
        model.zero_grad()
        torch.manual_seed(3)
        losses = model(inputs, ids, mask, image_ids)
        losses["loss"].backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
        return {name: value.detach() for name, value in losses.items()}, grads

    (image_losses, image_grads), (token_losses, token_grads) = losses_and_grads(images), losses_and_grads(tokens)
    assert image_losses.keys() == token_losses.keys() and image_grads.keys() == token_grads.keys()
    for name, value in image_losses.items():
        assert torch.equal(token_losses[name], value), name
    for name, grad in image_grads.items():
        assert torch.equal(token_grads[name], grad), name
    assert image_grads["ln_vision.weight"].abs().sum() > 0


def test_stage2_soft_prompt_and_loss_from_tokens_equal_those_from_images(tmp_path):
    opt_tokenizer().save_pretrained(tmp_path)
    model = tiny_stage2_model("opt", tmp_path, instruct=False).eval()
    images = torch.randn(len(TEXTS), 3, 32, 32, generator=torch.Generator().manual_seed(1))
    tokens = model.visual_encoder(images)
    assert tokens.dim() == 3
    assert torch.equal(model.soft_prompt(tokens), model.soft_prompt(images))
    assert torch.equal(model(tokens, INSTRUCTIONS, TEXTS)["loss"], model(images, INSTRUCTIONS, TEXTS)["loss"])


def test_a_matching_cache_is_reused_and_any_change_rebuilds_it(demo_data, tmp_path, capsys):
    model, dataset, cache = tiny_model(), caption_set(demo_data), tmp_path / "cache"
    build(model, dataset, cache)
    tokens_file = cache / TOKENS
    os.utime(tokens_file, ns=(0, 0))  # a rewrite would move the modification time
    capsys.readouterr()
    build(model, dataset, cache)
    assert "reusing" in capsys.readouterr().out and tokens_file.stat().st_mtime_ns == 0

    with torch.no_grad():
        model.visual_encoder.blocks[-1].mlp.fc2.bias.add_(0.5)
    build(model, dataset, cache)
    assert "encoder weights" in capsys.readouterr().out and tokens_file.stat().st_mtime_ns > 0
    assert torch.equal(stored_rows(cache, torch.float32),
                       torch.cat([model.visual_encoder(image[None]) for image in distinct_images(demo_data)]))

    entries = json.loads((demo_data / "coco_karpathy_train.json").read_text())
    fewer = tmp_path / "fewer.json"
    fewer.write_text(json.dumps([entry for entry in entries if entry["image"] != entries[0]["image"]]))
    build(model, caption_set(demo_data, fewer), cache)
    assert "image files" in capsys.readouterr().out
    with pytest.raises(InputError, match="other images"):
        FeatureCacheDataset(dataset, str(cache))

    (cache / META).unlink()  # what a build that died midway leaves
    build(model, dataset, cache)
    assert "no complete cache" in capsys.readouterr().out
    assert FeatureCacheDataset(dataset, str(cache))[0][0].shape == (5, 128)


@pytest.mark.parametrize("options, key", [(["data.augment=true"], "data.augment"),
                                          (["data.augment=false", "model.freeze_vit=false"], "model.freeze_vit")])
def test_a_cache_without_its_conditions_is_refused(demo_data, tmp_path, options, key):
    config = demo_config(tmp_path, demo_data)
    with pytest.raises(InputError, match=f"{key}: (true|false)"):
        train(config, tmp_path / "out", f"data.vit_feature_cache={tmp_path / 'cache'}", *options)
    assert not (tmp_path / "cache").exists()


def test_training_on_cached_tokens_logs_the_losses_of_training_on_images(demo_data, tmp_path, capsys):
    config, cache = demo_config(tmp_path, demo_data), tmp_path / "cache"
    short = ["train.epochs=1", "train.batch_size=8", "train.warmup_steps=2", "eval.k_test=4"]
    train(config, tmp_path / "images", "data.augment=false", *short)
    train(config, tmp_path / "built", "data.augment=false", f"data.vit_feature_cache={cache}", *short)
    train(config, tmp_path / "reused", "data.augment=false", f"data.vit_feature_cache={cache}", *short)
    out = capsys.readouterr().out
    assert out.count("feature cache") == 2 and "encoding 24 images" in out and "reusing" in out
    expected = read_log(tmp_path / "images")[0]
    for run in ("built", "reused"):
        logged = read_log(tmp_path / run)[0]
        assert logged.keys() == expected.keys()
        for key, value in expected.items():
            # The encoder runs on other batches of images than training's: last-bit differences in the tokens.
            assert logged[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (run, key)


def test_stage2_training_on_cached_tokens_logs_the_losses_of_training_on_images(demo_data, opt_dir, tmp_path,
                                                                                capsys):
    config, cache = stage2_config(tmp_path, demo_data, opt_dir), tmp_path / "cache"
    short = ["train.epochs=1", "data.test_file=null", "data.augment=false"]
    train(config, tmp_path / "images", *short, trainer=train_blip2_stage2)
    train(config, tmp_path / "built", *short, f"data.vit_feature_cache={cache}", trainer=train_blip2_stage2)
    assert "encoding 24 images" in capsys.readouterr().out
    expected, logged = read_log(tmp_path / "images")[0], read_log(tmp_path / "built")[0]
    assert logged.keys() == expected.keys()
    for key, value in expected.items():
        assert logged[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_two_processes_build_the_cache_of_one(demo_data, tmp_path):
    config = demo_config(tmp_path, demo_data)
    options = ["train.max_steps=1", "train.batch_size=8", "data.test_file=null", "data.augment=false",
               "eval.batch_size=1"]
    for name, launch in (("one", ()), ("two", TORCHRUN)):
        run_script(*launch, "train_blip2_stage1.py", "--config", config, "--output_dir", tmp_path / f"out_{name}",
                   "--device", "cpu", "--options", *options, f"data.vit_feature_cache={tmp_path / name}")
    assert (tmp_path / "one" / META).read_text() == (tmp_path / "two" / META).read_text()
    assert (tmp_path / "one" / TOKENS).read_bytes() == (tmp_path / "two" / TOKENS).read_bytes()
