"""Hugging Face config of an exported plmrun model (copied into the export folder by `plmrun export`)."""

from transformers import PretrainedConfig

from .vocab import PAD, VOCAB_SIZE


class PlmrunConfig(PretrainedConfig):
    model_type = "plmrun"

    def __init__(self, plmrun_model=None, **kwargs):
        self.plmrun_model = dict(plmrun_model or {})
        kwargs.setdefault("vocab_size", VOCAB_SIZE)
        kwargs.setdefault("pad_token_id", PAD)
        super().__init__(**kwargs)
