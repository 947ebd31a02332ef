"""Training and evaluation: the trainer and its hooks, accelerator set-up, optimizer, checkpoints,
evaluation, logging (docs/INTERFACES.md, "Training hooks")."""
