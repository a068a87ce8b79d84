#!/usr/bin/env bash
# Baichuan-7B (base model, remote code): LoRA on the fused W_pack, o_proj and the MLP; plain prompt format.
# MODEL=/path/to/baichuan-7b DATA=train.json TEST=test.json bash scripts/models/baichuan-7b.sh train|predict|merge  (see scripts/family.sh)
NAME=baichuan-7b TEMPLATE=default LORA_CONFIG=lora_config_baichuan.json TRUST=--trust_remote_code
. "$(dirname "$0")/../family.sh"
