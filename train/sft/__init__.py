"""Supervised fine-tuning: chat/instruction data with role-span loss masks, packing, LoRA,
classification heads. ``train/sft/trainer.py`` plugs it into the one training loop."""
