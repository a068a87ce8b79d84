"""Federated fine-tuning: clients train LoRA/FoRA adapters (on a 4/8-bit base if asked) on their own data;
a server averages the adapters every round. Built on Flower; this script runs its simulation engine.

    python train_federated.py --train_file data/train.json --num_clients 3 --num_rounds 5 \
        --local_steps 20 --validation_file data/test.json --output_dir output/federated
    python train_federated.py --partition files --client_files a.json,b.json --proximal_mu 0.01 ...

Every flag of train_lora.py applies to each client's local training (model, data, template, adapter,
optimizer); the federated ones are in fora/args/federated.py (`--help`). After every round
OUTPUT_DIR/round-N holds the global adapter in train_lora.py's format (the final one also in
OUTPUT_DIR), so predict_fora.py, merge_lora.py and chat take it unchanged. federated_history.json
and federated_*.png give the eval loss (ROUGE-L/BLEU-4 with --eval_generate) and each client's
traffic per round. Deployment across sites (a SuperLink and a SuperNode per site): see the README.
"""

from fora.cli import federated

if __name__ == "__main__":
    federated()
