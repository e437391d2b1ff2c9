"""Hugging Face ``transformers`` models built from small configs (nothing downloaded) bake, load at
100/50/25% and agree with the original at 100% (issue 14, item 2). Skipped without transformers."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_capture import bake_and_load  # noqa: E402

transformers.logging.set_verbosity_error()  # config notes about token ids outside the tiny vocabulary

VOCAB = 100


def _ids(batch: int = 4, length: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, 6:] = 0  # a padded sequence
    return ids, mask


def test_bert_encoder_from_auto_model_with_attention_mask(tmp_path):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32)
    model = transformers.AutoModel.from_config(config).eval()
    ids, mask = _ids()
    cal = {"input_ids": ids, "attention_mask": mask}
    _, names = bake_and_load(model, {k: v[:1] for k, v in cal.items()}, tmp_path, calibration=cal)
    assert names == ["last_hidden_state", "pooler_output"]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_decoder_forward_without_cache(tmp_path, family):
    torch.manual_seed(0)
    if family == "gpt2":
        config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32)
    else:
        config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    ids, _ = _ids()
    # input_ids alone, positionally: no attention mask, no cache object, int64 position ids made inside
    _, names = bake_and_load(model, ids[:1], tmp_path, calibration=ids)
    assert names == ["logits"]


def test_vit_image_model(tmp_path):
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=64)
    model = transformers.ViTModel(config).eval()
    pixels = torch.randn(4, 3, 16, 16)
    _, names = bake_and_load(model, pixels[:1], tmp_path, calibration=pixels)
    assert names == ["last_hidden_state", "pooler_output"]
