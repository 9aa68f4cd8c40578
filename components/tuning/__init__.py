"""Hyperparameter search: the search space (space), the Optuna study and its pruner (study), the training
process's pruning hook (pruning) and the end-of-search report (report). No Prefect here: flows/tune.py wires it."""
