"""Hugging Face wrapper of an exported plmrun model.

`plmrun export` copies this file next to plmrun's own model modules as they are (`plmrun/model/`:
registry, config, the architectures and what they import), so the architecture has one source. The
wrapper turns a padded [B, L] batch into plmrun's packed input (one token stream + cu_seqlens) and
scatters the outputs back to [B, L, ...].
"""

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput

from .config import ModelConfig
from .configuration_plmrun import PlmrunConfig
from .registry import build_model


class PlmrunForMaskedLM(PreTrainedModel):
    config_class = PlmrunConfig
    base_model_prefix = "plm"

    def __init__(self, config: PlmrunConfig):
        super().__init__(config)
        self.plm = build_model(ModelConfig(**config.plmrun_model))
        self.post_init()

    def _init_weights(self, module):
        """Weights come from model.safetensors; only the unsaved rotary frequencies are recomputed
        (transformers builds the model on the meta device, leaving non-persistent buffers empty)."""
        reset = getattr(module, "reset_buffers", None)
        if callable(reset):
            reset()

    def forward(
        self, input_ids, attention_mask=None, labels=None, output_hidden_states=None, return_dict=None, **kwargs
    ):
        if attention_mask is None:
            attention_mask = (input_ids != self.config.pad_token_id).long()
        valid = attention_mask.bool()
        B, L = input_ids.shape
        lengths = attention_mask.long().sum(1)
        tokens = input_ids[valid]
        positions = (attention_mask.long().cumsum(1) - 1)[valid]
        cu_seqlens = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        out = self.plm(
            tokens, positions, cu_seqlens, int(lengths.max()), output_hidden_states=bool(output_hidden_states)
        )

        def unpack(x):
            full = x.new_zeros(B, L, x.shape[-1])
            full[valid] = x
            return full

        logits = unpack(out.logits)
        hidden = tuple(unpack(h) for h in out.hidden_states) if output_hidden_states else None
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1), ignore_index=-100)
        return MaskedLMOutput(loss=loss, logits=logits, hidden_states=hidden)
