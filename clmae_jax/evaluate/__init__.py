"""Encoder evaluation: kNN, linear probe and few-shot (run.py: the "eval" experiment; evaluators.py: the same
protocols inside pretraining). `make_evaluator` is what the training loop calls."""


def make_evaluator(eval_config, config, mesh):
    """The evaluator of one config.evals entry during pretraining: `.every_steps`, `.best_key`, `.run(mae_params)`."""
    from clmae_jax.evaluate.evaluators import EncoderProtocolEvaluator  # Heavy imports only for runs that evaluate.
    return EncoderProtocolEvaluator(eval_config, config, mesh)
