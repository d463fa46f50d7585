"""What MAE and CL-MAE pretraining share: config.evals entries are encoder protocols (kNN, linear probe, few-shot)
run on the MAE encoder inside the train state."""
from clmae_jax.evaluate.evaluators import EncoderProtocolEvaluator
from clmae_jax.runtime.experiment import Experiment


class Pretraining(Experiment):
    """Base of the pretraining experiments: subclasses say where the MAE parameters sit in their state."""

    def encoder_params(self, state):
        """The MAE parameters inside `state` that the protocols read."""
        raise NotImplementedError

    def make_evaluator(self, name: str, eval_config):
        """config.evals.<name>: an encoder protocol on the MAE being pretrained."""
        return StateEvaluator(EncoderProtocolEvaluator(eval_config, self.config, self.mesh), self.encoder_params)


class StateEvaluator:
    """An encoder protocol applied to a train state: reads the MAE parameters out of it first."""

    def __init__(self, evaluator, encoder_params):
        self.evaluator, self.encoder_params = evaluator, encoder_params
        self.every_steps, self.best_key = evaluator.every_steps, evaluator.best_key

    def run(self, state) -> dict:
        """The protocol's scalars for the encoder in `state`."""
        return self.evaluator.run(self.encoder_params(state))
