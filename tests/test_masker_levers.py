"""The adversary levers of CL-MAE's masking module: temperature, logit bound, its own learning-rate schedule, and
the checks that refuse bad values. Defaults give the official module bit for bit."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clmae_jax import train_clmae
from clmae_jax.models.clmae import build_masker
from clmae_jax.models.masker import CurriculumMasker
from clmae_jax.runtime import loop, run_config, validate
from clmae_jax.runtime.errors import UserError
from configs import clmae_fashion_mnist

TOKENS = jax.random.normal(jax.random.PRNGKey(0), (3, 16, 32))


def logits_and_params():
    """A small module's parameters and its head's logits (the Dense output before the sigmoid)."""
    params = CurriculumMasker(depth=1).init(jax.random.PRNGKey(1), TOKENS)
    # A larger head makes the logits large enough that a bound of 2 or a temperature of 4 visibly matter.
    params = jax.tree_util.tree_map_with_path(
        lambda path, p: p * 10 if "head" in jax.tree_util.keystr(path) else p, params)
    _, captured = CurriculumMasker(depth=1).apply(params, TOKENS, capture_intermediates=True)
    return params, captured["intermediates"]["head"]["__call__"][0]


def test_defaults_are_the_official_sigmoid_bit_for_bit():
    params, _ = logits_and_params()
    official = CurriculumMasker(depth=1).apply(params, TOKENS)
    explicit = CurriculumMasker(depth=1, temperature=1.0, logit_bound=0.0).apply(params, TOKENS)
    np.testing.assert_array_equal(explicit, official)
    config = clmae_fashion_mnist.get_config("test")
    assert build_masker(config).temperature == 1.0 and build_masker(config).logit_bound == 0.0


def test_temperature_divides_the_logits():
    params, logits = logits_and_params()
    soft = CurriculumMasker(depth=1, temperature=4.0).apply(params, TOKENS)
    np.testing.assert_allclose(soft, jax.nn.sigmoid(logits / 4.0), atol=1e-4)
    assert jnp.max(jnp.abs(soft - 0.5)) < jnp.max(jnp.abs(jax.nn.sigmoid(logits) - 0.5))


def test_logit_bound_keeps_probabilities_off_the_tails():
    params, logits = logits_and_params()
    assert jnp.max(jnp.abs(logits)) > 4  # Otherwise the bound would not be tested.
    bounded = CurriculumMasker(depth=1, logit_bound=2.0).apply(params, TOKENS)
    np.testing.assert_allclose(bounded, jax.nn.sigmoid(2.0 * jnp.tanh(logits / 2.0)), atol=1e-4)
    assert jax.nn.sigmoid(-2.0) <= jnp.min(bounded) and jnp.max(bounded) <= jax.nn.sigmoid(2.0)


def schedule_config(name: str):
    config = clmae_fashion_mnist.get_config("test")
    config.clmae.masker_lr_schedule = name
    config.clmae.curriculum_stages = 10
    config.optimizer.lr, config.optimizer.warmup_epochs = 1e-3, 1.0
    return config, loop.Budget(config, steps_per_epoch=10, total_steps=100)


def test_switch_is_the_first_step_with_negative_lambda():
    config, budget = schedule_config("rewarm")
    switch = train_clmae.switch_step(config, budget)
    assert train_clmae.curriculum_weight_at(config, budget, switch) < 0
    assert train_clmae.curriculum_weight_at(config, budget, switch - 1) > 0
    assert switch == 50


def test_follow_is_the_mae_schedule_itself():
    config, budget = schedule_config("follow")
    mae_schedule = budget.learning_rate()[1]
    assert train_clmae.masker_lr_schedule(config, budget, mae_schedule) is mae_schedule


def test_rewarm_restarts_warm_up_and_cosine_at_the_switch():
    config, budget = schedule_config("rewarm")
    mae_schedule = budget.learning_rate()[1]
    schedule = train_clmae.masker_lr_schedule(config, budget, mae_schedule)
    for step in (0, 10, 30, 49):
        assert float(schedule(step)) == pytest.approx(float(mae_schedule(step)))
    assert float(schedule(50)) == 0.0  # A fresh warm-up from zero...
    assert float(schedule(60)) == pytest.approx(1e-3)  # ...to the peak after one epoch, ...
    assert float(schedule(60)) > float(mae_schedule(60))
    assert float(schedule(99)) < 1e-4  # ...then a cosine to the end.


def test_constant_holds_the_peak_after_the_warm_up():
    config, budget = schedule_config("constant")
    schedule = train_clmae.masker_lr_schedule(config, budget, budget.learning_rate()[1])
    assert float(schedule(5)) == pytest.approx(5e-4)
    assert [float(schedule(s)) for s in (10, 50, 99)] == pytest.approx([1e-3] * 3)


@pytest.mark.parametrize("field, value, message", [
    ("masker.temperature", -1.0, "config.clmae.masker.temperature=-1.0 must be a number > 0"),
    ("masker.temperature", 0.0, "config.clmae.masker.temperature=0.0 must be a number > 0"),
    ("masker.logit_bound", -2.0, "config.clmae.masker.logit_bound=-2.0 must be a number >= 0"),
    ("masker.depth", 0, "config.clmae.masker.depth=0 must be an integer >= 1"),
    ("masker.num_heads", 5, "config.clmae.masker.num_heads=5 does not divide the width"),
    ("masker_lr_schedule", "cosine", "config.clmae.masker_lr_schedule='cosine' is not a known value"),
])
def test_validate_names_the_bad_field_in_one_line(field, value, message):
    config = clmae_fashion_mnist.get_config("test")
    node, key = (config.clmae.masker, field.split(".")[1]) if "." in field else (config.clmae, field)
    node[key] = value
    with pytest.raises(UserError) as error:
        validate.check_config(config, options=train_clmae.OPTIONS)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_validate_accepts_the_defaults_and_the_adversarial_variant():
    for variant in ("test", "adversarial"):
        validate.check_config(clmae_fashion_mnist.get_config(variant), options=train_clmae.OPTIONS)
    official, adversarial = (clmae_fashion_mnist.get_config(v).to_dict() for v in ("", "adversarial"))
    assert adversarial["clmae"].pop("masker_lr_schedule") == "constant"  # The one field the variant changes.
    del official["clmae"]["masker_lr_schedule"]
    assert adversarial == official


def test_every_masker_config_field_reaches_the_module_and_shape_fields_guard_the_resume():
    config = clmae_fashion_mnist.get_config("test")
    config.clmae.masker.update(depth=3, num_heads=2, temperature=2.5, logit_bound=4.0)
    with config.clmae.masker.unlocked():
        config.clmae.masker.mlp_ratio = 2.0  # A module field no config sets: passed through all the same.
    masker = build_masker(config)
    assert {k: getattr(masker, k) for k in config.clmae.masker} == config.clmae.masker.to_dict()
    assert run_config.changes_parameters("clmae.masker.mlp_ratio") and run_config.changes_parameters(
        "clmae.masker.depth")
    assert not run_config.changes_parameters("clmae.masker.temperature")
