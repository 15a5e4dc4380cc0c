"""Measuring tools, not the pipeline: the timing harness every speed figure comes from
(`timing`: contenders in separate processes taking turns, and the in-process alternation the
report uses) and the XLA:CPU profiler of the forward pass and the training step
(`python -m vitjax.bench.profile_forward`). Nothing here is imported by a stage except the
report's timing."""
