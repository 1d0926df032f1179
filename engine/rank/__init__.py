"""Stage 4: training data, fitting rankers, the model registry, evaluation and explanations."""
