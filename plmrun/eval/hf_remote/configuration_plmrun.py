"""Hugging Face config of an exported plmrun model (copied into the export folder by `plmrun export`)."""
from transformers import PretrainedConfig


class PlmrunConfig(PretrainedConfig):
    model_type = "plmrun"

    def __init__(self, plmrun_model=None, **kwargs):
        self.plmrun_model = dict(plmrun_model or {})
        kwargs.setdefault("vocab_size", 33)
        kwargs.setdefault("pad_token_id", 1)
        super().__init__(**kwargs)
