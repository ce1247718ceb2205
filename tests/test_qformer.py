import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from models.qformer import (build_qformer, causal_mask_with_query_prefix, load_bert_weights, padding_mask,
                            unilm_mask)
from utils import InputError

TEXT_MASK = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])


def test_padding_mask_element_by_element():
    mask = padding_mask(TEXT_MASK)
    assert mask.shape == (2, 1, 1, 5) and mask.dtype == torch.bool
    for b in range(2):
        for j in range(5):
            assert mask[b, 0, 0, j] == bool(TEXT_MASK[b, j])


def test_causal_mask_with_query_prefix_element_by_element():
    num_query = 3
    mask = causal_mask_with_query_prefix(TEXT_MASK, num_query)
    assert mask.shape == (2, 1, 5, num_query + 5)
    for b in range(2):
        for i in range(5):
            for j in range(num_query + 5):
                expected = j < num_query or (j - num_query <= i and bool(TEXT_MASK[b, j - num_query]))
                assert mask[b, 0, i, j] == expected, (b, i, j)


def test_unilm_mask_element_by_element():
    num_query = 3
    mask = unilm_mask(num_query, TEXT_MASK)
    assert mask.shape == (2, 1, num_query + 5, num_query + 5)
    for b in range(2):
        for i in range(num_query + 5):
            for j in range(num_query + 5):
                if i < num_query:  # a query sees the queries only
                    expected = j < num_query
                else:  # a text token sees every query and the earlier, non-padding text
                    expected = j < num_query or (j <= i and bool(TEXT_MASK[b, j - num_query]))
                assert mask[b, 0, i, j] == expected, (b, i, j)


def tiny_bert_dir(tmp_path, vocab_size=40):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=vocab_size, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=512, max_position_embeddings=64)
    bert = BertForMaskedLM(config).eval()
    bert.save_pretrained(tmp_path / "bert")
    return tmp_path / "bert", bert


def test_initialised_from_bert_computes_berts_text_encoding(tmp_path):
    path, bert = tiny_bert_dir(tmp_path)
    qformer = build_qformer("tiny", vocab_size=41, encoder_width=64).eval()  # one extra row for [DEC]
    dec_row = qformer.bert.embeddings.word_embeddings.weight[40].clone()
    load_bert_weights(qformer, str(path))
    ids = torch.randint(0, 40, (2, 9))
    attention_mask = torch.ones_like(ids)
    attention_mask[0, 6:] = 0
    with torch.no_grad():
        bert.bert.embeddings.token_type_embeddings.weight.zero_()  # the Q-Former has no token types
        theirs = bert.bert(ids, attention_mask=attention_mask).last_hidden_state
        ours, _ = qformer.bert(ids, mask=padding_mask(attention_mask))
        torch.testing.assert_close(ours[0, :6], theirs[0, :6], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours[1], theirs[1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(qformer.lm_logits(ours)[..., :40], bert.cls(theirs), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(qformer.bert.embeddings.word_embeddings.weight[40], dec_row)  # [DEC] keeps its init
    for layer in qformer.bert.encoder.layer:  # the query FFN starts as a copy of BERT's FFN
        torch.testing.assert_close(layer.intermediate_query.dense.weight, layer.intermediate.dense.weight)
        torch.testing.assert_close(layer.output_query.LayerNorm.bias, layer.output.LayerNorm.bias)
    assert qformer.cls.predictions.decoder.weight is qformer.bert.embeddings.word_embeddings.weight


def test_bert_of_another_size_is_refused(tmp_path):
    path, _ = tiny_bert_dir(tmp_path)
    qformer = build_qformer("tiny", vocab_size=41, encoder_width=64, hidden_size=64, intermediate_size=256)
    with pytest.raises(InputError, match="model.qformer"):
        load_bert_weights(qformer, str(path))


def test_cross_attention_every_freq_th_layer_and_checkpoint_key_names():
    qformer = build_qformer("base", vocab_size=30523, encoder_width=1408, cross_attention_freq=2)
    keys = {f"Qformer.{k}": v.shape for k, v in qformer.state_dict().items()}
    crossing = sorted({int(k.split(".")[4]) for k in keys if ".crossattention." in k})
    assert crossing == [0, 2, 4, 6, 8, 10]
    assert keys["Qformer.bert.encoder.layer.0.crossattention.self.key.weight"] == (768, 1408)
    assert keys["Qformer.bert.embeddings.word_embeddings.weight"] == (30523, 768)
    assert keys["Qformer.cls.predictions.bias"] == (30523,)
    assert {"Qformer.cls.predictions.decoder.weight", "Qformer.cls.predictions.decoder.bias",
            "Qformer.cls.predictions.transform.dense.weight", "Qformer.cls.predictions.transform.LayerNorm.weight",
            "Qformer.bert.encoder.layer.3.intermediate_query.dense.weight",
            "Qformer.bert.encoder.layer.3.output_query.LayerNorm.bias",
            "Qformer.bert.embeddings.position_ids"} <= set(keys)
    assert not any(k.startswith("Qformer.bert.encoder.layer.1.crossattention") for k in keys)
