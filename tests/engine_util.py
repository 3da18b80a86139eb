"""Helpers for tests that drive the real engine with prepared batches."""
from __future__ import annotations


def tiny_uniter(tok, dropout: float = 0.0, checkpointing: bool = False):
    """The engine tests' UNITER (width 32, 2 layers, 16-d regions, 9 classes), seeded: the same
    initial weights in every test that builds it."""
    import torch

    from trainer.models.config import ModelConfig
    from trainer.models.pretrain import build_uniter

    torch.manual_seed(0)
    return build_uniter(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=64, img_dim=16, img_label_dim=9,
                                    hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
                                    activation_checkpointing=checkpointing))


def uniter_recipe(model, layout, device):
    """The run's UNITER recipe (default config, so WRA as `WraConfig()`), attached to `model` as the
    run attaches it: before the engine wraps the model."""
    from trainer.config import Config
    from trainer.recipes.uniter import UniterRecipe

    recipe = UniterRecipe(Config())
    recipe.attach(model, layout, device)
    return recipe


def demo_region_samples(data_dir, tok, n: int) -> list:
    """The first `n` samples of the test shards' training split, decoded (all must be good)."""
    from data.shards import decode_region_sample, iter_shard, read_manifest

    samples = []
    for shard in read_manifest(data_dir / "train").shards:
        for raw in iter_shard(shard):
            sample, reason = decode_region_sample(raw, tok, max_txt_len=60, img_dim=16, label_dim=9)
            assert reason is None, reason
            samples.append(sample)
        if len(samples) >= n:
            break
    assert len(samples) >= n, f"the test shards hold {len(samples)} samples, {n} wanted"
    return samples[:n]


class ListLoader:
    """Stands in for ResumableTaskLoader: gives the prepared micro-batches in order."""

    def __init__(self, batches):
        self.batches = list(batches)

    def next(self):
        return self.batches.pop(0)


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def engine_from_config(config_path, overrides=(), seed: int = 0):
    """(cfg, recipe, layout, loaders, engine) of a one-process run of the config, as the run builds
    them (needs the session's process group)."""
    import pytest
    import torch

    from data.tokenizer import tokenizer_from_config
    from trainer.config import load_config
    from trainer.engine import batch_layout, build_engine
    from trainer.recipes import recipe_class
    from trainer.run_setup import build_train_loaders

    cfg = load_config(str(config_path), list(overrides))
    device = torch.device("cpu")
    recipe = recipe_class(cfg.model.arch)(cfg)
    layout = batch_layout(cfg.optim, cfg.data.micro_batch_size, 1)
    torch.manual_seed(seed)
    model = recipe.build_model()
    recipe.attach(model, layout, device)
    loaders = build_train_loaders(cfg, recipe, tokenizer_from_config(cfg.data.tokenizer), layout, 0, {})
    recipe.on_loaders(loaders, layout)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOCAL_RANK", "0")
        engine, _ = build_engine(model, cfg.optim, cfg.parallel, cfg.precision, layout, cfg.train.max_steps,
                                 device)
    return cfg, recipe, layout, loaders, engine
