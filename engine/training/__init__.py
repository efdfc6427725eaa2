"""A training run: `run(cfg)` wires runtime, model, data, optimizer, checkpointer and metrics (trainer.py);
`train_step` does one optimizer step (step.py)."""
