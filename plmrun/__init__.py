"""plmrun: speedrun pretraining of protein language models."""

__version__ = "0.1.0"
