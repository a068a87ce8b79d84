"""The adapter methods: PEFT's LoRA with the addmm fast path (lora_fast), FoRA as a PEFT LoRA variant (fora),
and attaching, loading and counting them (attach)."""
