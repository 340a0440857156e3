"""Fine-tuning of pretrained models on labelled tables (`plmrun finetune`); see run.py."""
