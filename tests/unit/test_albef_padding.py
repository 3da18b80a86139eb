"""ALBEF's word embeddings have padding_idx = [PAD] (as its reference's Hugging Face BertEmbeddings);
UNITER's do not (as UNITER's code): only ALBEF's [PAD] row is kept out of the gradient."""
import pytest
import torch

from trainer.models.albef import Albef
from trainer.models.config import AlbefConfig, ModelConfig
from trainer.models.pretrain import UniterForPretraining

TINY_ALBEF = dict(vocab_size=40, hidden_size=16, num_attention_heads=2, intermediate_size=32, text_layers=1,
                  fusion_layers=1, max_position_embeddings=16, image_size=32, patch_size=16, vision_width=16,
                  vision_layers=1, vision_heads=2, vision_mlp=32, embed_dim=8, queue_size=8, k_test=2)


def ids_with_pad_inside() -> torch.Tensor:
    # [CLS] w [PAD] w [SEP]: a random MLM replacement can put [PAD] among attended tokens
    return torch.tensor([[2, 7, 0, 9, 3], [2, 0, 11, 12, 3]])


def weighted_sum(hidden: torch.Tensor) -> torch.Tensor:
    """A loss whose gradient reaches every input row (a plain sum of LayerNorm outputs has ~0 gradient)."""
    return (hidden * torch.randn(hidden.shape, generator=torch.Generator().manual_seed(1))).sum()


def test_albef_pad_row_starts_at_zero_and_gets_no_gradient():
    torch.manual_seed(0)
    model = Albef(AlbefConfig(**TINY_ALBEF))
    words = model.text_encoder.embeddings.word_embeddings
    assert words.padding_idx == 0 and torch.count_nonzero(words.weight[0]) == 0
    ids = ids_with_pad_inside()
    weighted_sum(model.text_encoder.text(ids, torch.ones_like(ids))).backward()
    assert torch.count_nonzero(words.weight.grad[0]) == 0
    assert words.weight.grad[7].abs().min() > 1e-6


def test_uniter_keeps_a_trainable_pad_row():
    torch.manual_seed(0)
    model = UniterForPretraining(ModelConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=32, img_dim=8,
                                             img_label_dim=3))
    words = model.uniter.embeddings.word_embeddings
    assert words.padding_idx is None and torch.count_nonzero(words.weight[0]) > 0
    ids = ids_with_pad_inside()
    weighted_sum(model.uniter.embeddings(ids, torch.arange(ids.size(1))[None])).backward()
    assert words.weight.grad[0].abs().min() > 1e-6


def test_pad_token_id_must_be_a_token():
    with pytest.raises(ValueError, match="pad_token_id"):
        AlbefConfig(**{**TINY_ALBEF, "pad_token_id": 40})


def test_pad_token_id_is_checked_against_the_vocabulary():
    from data.tokenizer import load_tokenizer
    from trainer.config import Config
    from trainer.config_files import ConfigError
    from trainer.recipes import recipe_class
    from trainer.run_setup import validate_against_data

    tok = load_tokenizer("data/vocab/demo-vocab.txt")
    cfg = Config(model=AlbefConfig(vocab_size=tok.vocab_size, pad_token_id=1), tasks={"albef": 1})
    with pytest.raises(ConfigError, match=r"model.pad_token_id=1 but \[PAD\] is token 0"):
        validate_against_data(cfg, recipe_class("albef")(cfg), tok)
