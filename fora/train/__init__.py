"""Training: the recipe (recipe.main, what train_lora.py runs), the Trainer subclass and what it is made of
(loss, sampler, staged checkpoints), and the loss-curve callback."""
