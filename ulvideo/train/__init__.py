"""Training: the one loop for both stages under DeepSpeed ZeRO (`loop`), what each stage trains
(`objectives`), resumable checkpoints (`checkpoint`) and what is applied to the networks from
outside (`apply`: activation checkpointing)."""
