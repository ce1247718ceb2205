import torch
from transformers import BertConfig
from transformers import BertModel as HFBertModel

from models.med import BertAttention, BertModel, TextConfig


def test_text_mode_matches_transformers_bert():
    """Text mode is BERT: same weights (token-type embedding zero) -> same hidden states as transformers'."""
    config = TextConfig(vocab_size=50, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=32)
    torch.manual_seed(0)
    ours = BertModel(config).eval()
    hf = HFBertModel(BertConfig(vocab_size=50, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                intermediate_size=128, max_position_embeddings=32, type_vocab_size=1,
                                hidden_act="gelu", layer_norm_eps=1e-12), add_pooling_layer=False).eval()
    state = {k: v for k, v in ours.state_dict().items() if k != "embeddings.position_ids"}
    state["embeddings.token_type_embeddings.weight"] = torch.zeros(1, 64)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"embeddings.token_type_ids"}
    input_ids = torch.randint(1, 50, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    with torch.no_grad():
        expected = hf(input_ids=input_ids, attention_mask=mask, token_type_ids=torch.zeros_like(input_ids))
        torch.testing.assert_close(ours(input_ids, mask), expected.last_hidden_state, atol=1e-5, rtol=1e-5)


def test_multimodal_mode_uses_the_image():
    config = TextConfig(vocab_size=50, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=32, encoder_width=48)
    torch.manual_seed(0)
    model = BertModel(config, lambda cfg, i: BertAttention(cfg, cfg.encoder_width)).eval()
    assert model.state_dict()["encoder.layer.0.crossattention.self.key.weight"].shape == (64, 48)
    ids, mask = torch.randint(1, 50, (1, 7)).repeat(2, 1), torch.ones(2, 7, dtype=torch.long)
    image = torch.randn(2, 5, 48)
    with torch.no_grad():
        a, b = model(ids, mask, image), model(ids, mask, image.flip(0))
    assert not torch.allclose(a, b)
    torch.testing.assert_close(a[0], b[1])  # each row attends to its own image only
