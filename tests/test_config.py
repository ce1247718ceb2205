import dataclasses
import re

import pytest

from eval_caption import CaptionConfig
from models.blip2_lm import Blip2LMConfig
from models.blip2_qformer import Blip2QformerConfig
from models.blip_nlvr import BlipNLVRConfig
from train_nlvr import NLVRConfig
from utils import InputError, config_section, load_config, metrics_table, save_config

BASE = """
data:
  train_file: a.json
  val_file: b.json
  test_file: c.json
"""


def write(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_yaml_1_2_scalars_and_defaults(tmp_path):
    cfg = load_config(write(tmp_path, BASE + "train:\n  lr: 3e-5\n  epochs: 2\nmodel:\n  tokenizer: off\n"),
                      NLVRConfig)
    assert cfg.train.lr == 3e-5 and isinstance(cfg.train.lr, float)
    assert cfg.model.tokenizer == "off"  # YAML 1.1 would have made this False
    assert cfg.train.epochs == 2
    assert cfg.eval.batch_size == NLVRConfig.__dataclass_fields__["eval"].default_factory().batch_size


def test_overrides_are_dotted_and_typed(tmp_path):
    cfg = load_config(write(tmp_path, BASE), NLVRConfig,
                      ["train.lr=1e-4", "train.grad_clip=1", "data.crop_scale=[0.9, 1.0]", "train.amp=bf16",
                       "model.pretrained=null", "model.vit_grad_ckpt=true", "train.global_batch_size=256"])
    assert cfg.train.lr == 1e-4
    assert cfg.train.grad_clip == 1.0 and isinstance(cfg.train.grad_clip, float)
    assert cfg.data.crop_scale == (0.9, 1.0)
    assert cfg.train.amp == "bf16"
    assert cfg.model.pretrained is None
    assert cfg.model.vit_grad_ckpt is True
    assert cfg.train.global_batch_size == 256


@pytest.mark.parametrize("text, overrides, message", [
    (BASE + "train:\n  lrr: 1e-4\n", [], "unknown key 'train.lrr'; did you mean 'train.lr'?"),
    (BASE + "trian:\n  lr: 1e-4\n", [], "unknown key 'trian'; did you mean 'train'?"),
    (BASE, ["train.lrr=1e-4"], "unknown key 'train.lrr'; did you mean 'train.lr'?"),
    (BASE, ["model.vit.size=base"], "'model.vit' is a value, not a section"),
    (BASE, ["train.lr"], "expected key=value"),
    (BASE + "train:\n  epochs: ten\n", [], "train.epochs must be int; got 'ten' (str)"),
    (BASE + "train:\n  epochs: 2.5\n", [], "train.epochs must be int; got 2.5"),
    (BASE + "train:\n  epochs: true\n", [], "train.epochs must be int; got True"),
    (BASE, ["train.amp=off"], "train.amp must be one of fp32, bf16, fp16; got 'off'"),
    (BASE, ["data.crop_scale=[0.5]"], "data.crop_scale must be a list of 2 values"),
    (BASE, ["data.crop_scale=[0.5, big]"], "data.crop_scale[1] must be float"),
    (BASE + "train: 3\n", [], "train must be a mapping"),
    ("data:\n  train_file: a.json\n  val_file: b.json\n", [], "missing key 'data.test_file'"),
    ("model: {}\n", [], "missing key 'data.train_file'"),
    ("data: [1, 2\n", [], "is not valid YAML"),
])
def test_bad_config_is_named(tmp_path, text, overrides, message):
    with pytest.raises(InputError) as err:
        load_config(write(tmp_path, text), NLVRConfig, overrides)
    assert message in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_config(tmp_path / "nope.yaml", NLVRConfig)


def test_saved_config_loads_back_identically(tmp_path):
    cfg = load_config(write(tmp_path, BASE), NLVRConfig, ["train.lr=2e-5", "data.crop_scale=[0.7, 1.0]"])
    save_config(cfg, tmp_path / "saved.yaml")
    again = load_config(tmp_path / "saved.yaml", NLVRConfig)
    assert dataclasses.asdict(again) == dataclasses.asdict(cfg)


CAPTION = "data:\n  test_file: t.json\nmodel:\n  arch: {arch}\n  {key}: {value}\n"


@pytest.mark.parametrize("arch, key, value, schema", [
    ("blip2_opt", "prompt", "a photo of", Blip2LMConfig),
    ("blip2_t5_instruct", "lm", "google/flan-t5-xl", Blip2LMConfig),
    ("blip2_qformer", "embed_dim", 64, Blip2QformerConfig),
])
def test_model_section_is_read_by_its_arch(tmp_path, arch, key, value, schema):
    cfg = load_config(write(tmp_path, CAPTION.format(arch=arch, key=key, value=value)), CaptionConfig,
                      ["model.num_query_tokens=8"])
    assert type(cfg.model) is schema and getattr(cfg.model, key) == value and cfg.model.num_query_tokens == 8


@pytest.mark.parametrize("text, message", [
    ("data: {}\nmodel:\n  prompt: hi\n", "model.arch must say which model this is, one of blip2_opt, blip2_llm, "
                                         "blip2_llm_instruct, blip2_t5, blip2_t5_instruct, blip2_qformer; got None"),
    ("data: {}\nmodel:\n  arch: blip_nlvr\n", "is a config of model.arch blip_nlvr, which train_nlvr.py reads"),
    ("data: {}\nmodel:\n  arch: blip3\n", "got 'blip3'"),
    ("data: {}\nmodel:\n  arch: blip2_qformer\n  prompt: hi\n", "unknown key 'model.prompt'"),
])
def test_model_section_without_a_known_arch_is_refused(tmp_path, text, message):
    with pytest.raises(InputError, match=re.escape(message)):
        load_config(write(tmp_path, text), CaptionConfig)


def test_a_config_of_another_script_is_named_before_its_keys_are_read(tmp_path):
    """A stage-1 config given to train_nlvr.py: its arch, not its first unknown key (data.train), is the message."""
    text = "model:\n  arch: blip2_qformer\n  embed_dim: 64\ndata:\n  train: []\n  eval_max_words: 30\n"
    message = ("is a config of model.arch blip2_qformer, which train_blip2_stage1.py, eval_retrieval.py or "
               "eval_caption.py reads; this script reads model.arch blip_nlvr")
    with pytest.raises(InputError, match=re.escape(message)):
        load_config(write(tmp_path, text), NLVRConfig)


@pytest.mark.parametrize("text, origin, mapped", [
    ("image_root: '/export/share/datasets/vision/NLVR2/'\nann_root: annotation\npretrained: model_base.pth\n"
     "vit: base\nbatch_size_train: 16\nbatch_size_test: 64\nmax_epoch: 15\nimage_size: 384\ninit_lr: 3e-5\n",
     "BLIP", ["init_lr -> train.lr", "image_root -> data.image_root", "max_epoch -> train.epochs",
              "batch_size_test -> eval.batch_size"]),
    ("model:\n  arch: blip2_opt\n  model_type: pretrain_opt2.7b\ndatasets:\n  coco_caption: {}\nrun:\n"
     "  init_lr: 1e-4\n  max_epoch: 10\n", "LAVIS", ["run.init_lr -> train.lr", "model.num_query_token -> "
                                                     "model.num_query_tokens"]),
])
def test_an_original_blip_or_lavis_config_is_answered_with_the_key_mapping(tmp_path, text, origin, mapped):
    with pytest.raises(InputError) as error:
        load_config(write(tmp_path, text), NLVRConfig)
    message = str(error.value)
    assert f"is a config of the original {origin} code, not of this project" in message
    assert all(pair in message for pair in mapped), message


@pytest.mark.parametrize("override, message", [
    ("train.epochs=0", "train.epochs must be at least 1; got 0"),
    ("train.epochs=-1", "train.epochs must be at least 1; got -1"),
    ("train.max_steps=0", "train.max_steps must be at least 1; got 0"),
    ("train.batch_size=0", "train.batch_size must be at least 1; got 0"),
    ("train.batch_size=-4", "train.batch_size must be at least 1; got -4"),
    ("train.lr=-1e-4", "train.lr must be greater than 0; got -0.0001"),
    ("train.weight_decay=-0.1", "train.weight_decay must be at least 0; got -0.1"),
    ("data.num_workers=-1", "data.num_workers must be at least 0; got -1"),
    ("data.crop_scale=[1.0, 0.5]", "data.crop_scale must be [a, b] with 0 < a <= b <= 1; got (1.0, 0.5)"),
    ("data.max_words=0", "data.max_words must be at least 1; got 0"),
    ("model.image_size=40", "model.image_size 40 is not a multiple of patch_size 16: the last 8 pixels"),
    ("eval.batch_size=0", "eval.batch_size must be at least 1; got 0"),
])
def test_numbers_out_of_range_are_named_with_the_bound(tmp_path, override, message):
    with pytest.raises(InputError, match=re.escape(message)):
        load_config(write(tmp_path, BASE), NLVRConfig, [override])


def test_cross_key_checks_run_after_the_overrides(tmp_path):
    with pytest.raises(InputError, match=re.escape("eval.min_new_tokens (40) exceeds max_new_tokens (30)")):
        load_config(write(tmp_path, CAPTION.format(arch="blip2_opt", key="prompt", value="x")), CaptionConfig,
                    ["eval.min_new_tokens=40"])
    load_config(write(tmp_path, CAPTION.format(arch="blip2_opt", key="prompt", value="x")), CaptionConfig,
                ["eval.min_new_tokens=40", "eval.max_new_tokens=50"])


def test_config_section_ignores_the_other_sections(tmp_path):
    path = write(tmp_path, BASE + "model:\n  arch: blip_nlvr\n  vit: tiny\ntrain:\n  whatever: 1\n")
    cfg = config_section(path, "model", BlipNLVRConfig | Blip2LMConfig)
    assert cfg == BlipNLVRConfig(vit="tiny")
    with pytest.raises(InputError, match="has no 'model' section"):
        config_section(write(tmp_path, BASE), "model", BlipNLVRConfig)


def test_metrics_table_has_a_row_per_split_and_a_column_per_metric():
    table = metrics_table({"val": {"r1": 12.5, "n": 10}, "test_text_only": {"r1": 1.0, "CIDEr": 0.123456}})
    header, *rows = [line.split() for line in table.splitlines()]
    assert header == ["r1", "n", "CIDEr"]
    assert rows == [["val", "12.5000", "10"], ["test_text_only", "1.0000", "0.1235"]]
