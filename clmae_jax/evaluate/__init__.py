"""Encoder evaluation: kNN, linear probe and few-shot on shared features (protocols.py); run.py is the "eval"
experiment, evaluators.py the same protocols inside pretraining."""
