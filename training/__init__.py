"""Traffic simulator, offline RL training, evaluation harness and the MLflow registry."""
