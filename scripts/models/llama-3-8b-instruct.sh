#!/usr/bin/env bash
# LLaMA-3-8B-Instruct: the tokenizer's own chat template; every attention and MLP projection.
# MODEL=/path/to/llama-3-8b-instruct DATA=train.json TEST=test.json bash scripts/models/llama-3-8b-instruct.sh train|predict|merge  (see scripts/family.sh)
NAME=llama-3-8b-instruct TEMPLATE=auto LORA_CONFIG=lora_config_llama.json TRUST=
. "$(dirname "$0")/../family.sh"
