import pytest
import torch

from models.blip_nlvr import BlipNLVR, load_checkpoint
from models.med import TEXT_SIZES
from models.tokenizer import init_tokenizer
from tests.reference_nlvr import nlvr_forward
from utils import InputError


def make_model(seed=0, image_size=32, vit="tiny", text="tiny", vocab_size=40):
    torch.manual_seed(seed)
    model = BlipNLVR(vit=vit, image_size=image_size, patch_size=16, drop_path_rate=0.0, text_size=text,
                     vocab_size=vocab_size, enc_token_id=vocab_size - 1)
    with torch.no_grad():  # move every tensor off its tidy initial value (unit LayerNorms, zero biases)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def inputs(batch=2, image_size=32, vocab_size=40, length=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab_size - 2, (batch, length), generator=g)
    ids[:, 0] = 2
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, length - 3:] = 0
    return (torch.randn(batch, 3, image_size, image_size, generator=g),
            torch.randn(batch, 3, image_size, image_size, generator=g), ids, mask)


def to_reference(model, image0, image1, ids, mask, vit_heads, text_heads):
    return nlvr_forward(model.state_dict(), image0, image1, ids, mask, vit_heads, text_heads, model.enc_token_id)


@pytest.fixture
def text_depths(monkeypatch):
    """Text encoders "tiny2", "tiny8" of 2 and 8 layers beside "tiny" (4) and "base" (12)."""
    for layers in (2, 8):
        monkeypatch.setitem(TEXT_SIZES, f"tiny{layers}", {**TEXT_SIZES["tiny"], "num_hidden_layers": layers})


@pytest.mark.parametrize("size, text", [("tiny", "tiny"), ("tiny", "tiny8"), ("base", "base")])
def test_logits_equal_the_original_computation(size, text, text_depths):
    image_size = 32 if size == "tiny" else 64
    vocab_size = 40 if size == "tiny" else 30524
    model = make_model(image_size=image_size, vit=size, text=text, vocab_size=vocab_size)
    heads = 4 if size == "tiny" else 12
    x = inputs(image_size=image_size, vocab_size=vocab_size)
    with torch.no_grad():
        logits = model(*x)
        assert logits.shape == (2, 2)
        torch.testing.assert_close(logits, to_reference(model, *x, heads, heads), atol=1e-5, rtol=0)


@pytest.mark.parametrize("text, layers", [("tiny2", 2), ("tiny", 4), ("tiny8", 8), ("base", 12)])
def test_merge_layers_follow_the_original_rule(text, layers, text_depths):
    model = make_model(vit="tiny", text=text, image_size=32, vocab_size=40)
    merge = [i for i in range(layers) if f"text_encoder.encoder.layer.{i}.crossattention.output.merge_layer.weight"
             in model.state_dict()]
    # BLIP's nlvr_encoder.py: BertLayer(config, layer_num) with merge=(is_cross_attention and layer_num>=6)
    assert merge == [i for i in range(layers) if i >= 6]
    hidden = model.text_encoder.config.hidden_size
    for i in merge:
        assert model.state_dict()[f"text_encoder.encoder.layer.{i}.crossattention.output.merge_layer.weight"].shape \
            == (hidden, 2 * hidden)


def test_nlvr_layout_loads_strictly(tmp_path):
    source, target = make_model(seed=0), make_model(seed=1)
    torch.save({"model": source.state_dict()}, tmp_path / "nlvr.pth")
    assert load_checkpoint(target, str(tmp_path / "nlvr.pth")) == []
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(target(*x), source(*x))

    state = source.state_dict()
    del state["cls_head.2.bias"]
    torch.save({"model": state}, tmp_path / "incomplete.pth")
    with pytest.raises(InputError, match=r"missing cls_head\.\* \(1\)"):
        load_checkpoint(target, str(tmp_path / "incomplete.pth"))

    state = {**source.state_dict(), "extra.weight": torch.zeros(1)}
    torch.save({"model": state}, tmp_path / "extra.pth")
    with pytest.raises(InputError, match=r"unexpected extra\.\* \(1\)"):
        load_checkpoint(target, str(tmp_path / "extra.pth"))


def pretrained_layout(model, image_size):
    """A BLIP pre-trained (`model_base.pth`) state dict made from `model`: single cross-attention, no merge_layer
    or cls_head, position embeddings of `image_size`, plus the tensors NLVR does not use."""
    state = {}
    for key, value in model.state_dict().items():
        if ".merge_layer." in key or key.startswith("cls_head.") or ".self1." in key or ".dense1." in key:
            continue
        state[key.replace(".self0.", ".self.").replace(".dense0.", ".dense.")] = value.clone()
    side = image_size // 16
    state["visual_encoder.pos_embed"] = torch.randn(1, 1 + side * side, model.visual_encoder.embed_dim)
    for name in ("text_decoder.bert.embeddings.word_embeddings.weight", "text_decoder.cls.predictions.bias",
                 "visual_encoder_m.cls_token", "text_encoder_m.encoder.layer.0.crossattention.self.query.weight",
                 "vision_proj.weight", "itm_head.weight", "image_queue", "text_queue", "idx_queue", "temp"):
        state[name] = torch.zeros(2)
    return state


def test_pretrained_layout_is_remapped(tmp_path, capsys, text_depths):
    source = make_model(seed=0, image_size=48, text="tiny8")
    target = make_model(seed=1, image_size=48, text="tiny8")
    state = pretrained_layout(source, image_size=32)
    torch.save({"model": state}, tmp_path / "model_base.pth")
    before = {k: v.clone() for k, v in target.state_dict().items()}
    left = load_checkpoint(target, str(tmp_path / "model_base.pth"))

    loaded = target.state_dict()
    for i in range(8):
        for part in ("query", "key", "value"):
            for suffix in ("weight", "bias"):
                original = state[f"text_encoder.encoder.layer.{i}.crossattention.self.{part}.{suffix}"]
                for twin in ("self0", "self1"):
                    torch.testing.assert_close(loaded[f"text_encoder.encoder.layer.{i}.crossattention.{twin}."
                                                      f"{part}.{suffix}"], original)
        for twin in ("dense0", "dense1"):
            torch.testing.assert_close(loaded[f"text_encoder.encoder.layer.{i}.crossattention.output.{twin}.weight"],
                                       state[f"text_encoder.encoder.layer.{i}.crossattention.output.dense.weight"])
    kept = [k for k in loaded if ".merge_layer." in k or k.startswith("cls_head.")]
    assert len(kept) == 2 * 2 + 4  # merge_layer of text layers 6 and 7, cls_head
    for key in kept:
        torch.testing.assert_close(loaded[key], before[key])
    pos = loaded["visual_encoder.pos_embed"]
    assert pos.shape == (1, 1 + 9, 128)
    torch.testing.assert_close(pos[:, 0], state["visual_encoder.pos_embed"][:, 0])
    assert sorted(left) == sorted(kept)  # what evaluation refuses to leave at its initialisation
    out = capsys.readouterr().out
    assert "BLIP pre-trained layout" in out
    assert "text_decoder.* (2)" in out and "temp (1)" in out and "visual_encoder_m.* (1)" in out


def test_pretrained_layout_with_other_missing_tensors_is_refused(tmp_path):
    source, target = make_model(seed=0), make_model(seed=1)
    state = pretrained_layout(source, image_size=32)
    del state["visual_encoder.blocks.0.attn.qkv.weight"]
    torch.save({"model": state}, tmp_path / "model_base.pth")
    with pytest.raises(InputError, match=r"missing visual_encoder\.\* \(1\)"):
        load_checkpoint(target, str(tmp_path / "model_base.pth"))


def test_shape_mismatch_names_the_config(tmp_path):
    torch.save({"model": make_model(vocab_size=41).state_dict()}, tmp_path / "other.pth")
    with pytest.raises(InputError, match="does not fit this model"):
        load_checkpoint(make_model(), str(tmp_path / "other.pth"))


def test_checkpoint_from_url(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    source, target = make_model(seed=0), make_model(seed=1)
    torch.save({"model": source.state_dict()}, tmp_path / "model_base_nlvr.pth")
    load_checkpoint(target, (tmp_path / "model_base_nlvr.pth").as_uri())
    assert (tmp_path / "torch_home" / "hub" / "checkpoints" / "model_base_nlvr.pth").exists()
    torch.testing.assert_close(target.state_dict(), source.state_dict())


def test_missing_checkpoint_file(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_checkpoint(make_model(), str(tmp_path / "nope.pth"))


def test_tokenizer_adds_dec_and_enc_after_the_bert_vocabulary(tmp_path):
    words = [f"w{i}" for i in range(30522 - 5)]
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words) + "\n")
    tokenizer = init_tokenizer(str(tmp_path))
    assert len(tokenizer) == 30524
    assert tokenizer.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [30522, 30523]
    assert tokenizer.bos_token_id == 30522 and tokenizer.enc_token_id == 30523
    ids = tokenizer(["W3 w7"]).input_ids[0]
    assert ids == [2, 8, 12, 3]


def test_tokenizer_errors_say_how_to_fix(tmp_path):
    with pytest.raises(InputError, match="has no vocab.txt"):
        init_tokenizer(str(tmp_path))
    with pytest.raises(InputError, match="model.tokenizer"):
        init_tokenizer(str(tmp_path / "no" / "such" / "dir"))
