"""Checkpoint names: what determines the trained weights, and nothing else."""

from __future__ import annotations

from patchbench.defense import get_defense
from patchbench.running.cache import model_key
from patchbench.running.train import TrainConfig


def key(name: str, recipe: TrainConfig | None = None, **params) -> str:
    return model_key(get_defense(name)(**params), "fashion-mnist", recipe or TrainConfig())


def test_certification_only_parameters_share_one_checkpoint():
    assert key("ds-column", threshold=0.2) == key("ds-column", threshold=0.35)
    assert key("ds-column", ablation_size=4) != key("ds-column", ablation_size=6)
    assert key("ds-column") != key("ds-row")


def test_every_recipe_field_changes_the_name():
    base = key("bagcert")
    changed = [TrainConfig(epochs=5), TrainConfig(seed=1), TrainConfig(hold_out_val=True),
               TrainConfig(max_images=100), TrainConfig(hflip=True),
               TrainConfig(precision="bf16")]
    assert len({base, *(key("bagcert", recipe) for recipe in changed)}) == 1 + len(changed)


def test_new_recipe_fields_at_their_default_keep_old_names():
    # The name the first checkpoints were saved under, before hold_out_val existed.
    old_name = "fashion-mnist-bagcert-4e9a942edcfe"
    assert key("bagcert", TrainConfig(epochs=8, crop_padding=2), rf=7) == old_name
