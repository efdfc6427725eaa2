"""The training config: its schema (sections.py, in the vocabulary of schema.py), turned from Hydra's
composed dict into a validated TrainConfig (load.py), and Hydra's side: recipes, composing, the
generated conf/config.yaml and `--help` (compose.py). Nothing is imported here."""
