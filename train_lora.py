"""Fine-tune a causal LM with LoRA, FoRA or in full, single process or under deepspeed/torchrun.

    python train_lora.py --train_file data/train.json --output_dir output/demo --lora_rank 8
    deepspeed --num_gpus 2 train_lora.py ... --deepspeed ds_config.json
    python train_lora.py args.yaml

Every flag is documented in fora/args/ (or `python train_lora.py --help`); the recipe is fora/train/recipe.py.
"""

from fora.cli import train

if __name__ == "__main__":
    train()
