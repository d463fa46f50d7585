"""The protocols as evaluators inside pretraining: `run(mae_params)` every `every_steps` steps, compiled once.

The encoder's structure comes from the training config; each run extracts features with the current parameters
(optionally of the first `num_train` / `num_test` images only, so kNN every few hundred steps stays cheap).
"""
import jax
import ml_collections

from clmae_jax.evaluate import protocols
from clmae_jax.evaluate.encoder import config_encoder, encoder_params
from clmae_jax.models.geometry import check_same_encoder, config_geometry, params_geometry
from clmae_jax.models.clmae import build_mae, init_params


def best_key(name: str, kind: str, eval_config) -> str:
    """The scalar whose best value results.json tracks: top-1, for few-shot at the most shots of the first method."""
    if kind == "fewshot":
        return f"{name}_{max(eval_config.shots)}shot_{eval_config.methods[0]}_acc1"
    return f"{name}_acc1"


class EncoderProtocolEvaluator:
    """kNN, linear probe (cached features) or few-shot of the encoder being pretrained."""

    def __init__(self, eval_config, config, mesh):
        self.name = eval_config.get("name") or eval_config.get("type", "")
        self.kind = protocols.protocol_type(self.name, eval_config)
        self.eval_config, self.config = ml_collections.ConfigDict(eval_config.to_dict()), config
        if self.kind == "linear":
            self.eval_config.cache_features = True  # During pretraining the probe trains on cached features.
        self.every_steps, self.best_key = eval_config.get("every_steps", 0), best_key(self.name, self.kind, eval_config)
        model = build_mae(config)
        shapes = jax.eval_shape(lambda: encoder_params(init_params(model, config, jax.random.PRNGKey(0))))
        encoder = config_encoder(config, shapes, "pretraining", dtype=config.model.dtype)
        batch = eval_config.get("batch_size") or config.get("eval_batch_size") or config.batch_size
        # One FeatureSets for the whole run, so its jitted feature function is compiled once.
        self.features = protocols.FeatureSets(mesh, config.input, encoder, None,
                                              protocols.pools_needed(self.kind, eval_config), batch)

    def run(self, mae_params) -> dict:
        """The protocol's scalars (percent) for the encoder inside `mae_params`."""
        params = encoder_params(mae_params)
        check_same_encoder(params_geometry(params), "the parameters given to the evaluator",
                           config_geometry(self.config), "the training config")
        self.features.params, self.features.banks = params, {}  # New weights: old features are stale.
        results = protocols.PROTOCOLS[self.kind](self.eval_config, self.features, prefix=self.name)
        return {k: v for k, v in results.items() if "_seed" not in k}
