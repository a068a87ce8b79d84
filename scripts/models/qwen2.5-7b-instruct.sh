#!/usr/bin/env bash
# Qwen2.5-7B-Instruct: the tokenizer's own (ChatML) chat template; every attention and MLP projection.
# MODEL=/path/to/qwen2.5-7b-instruct DATA=train.json TEST=test.json bash scripts/models/qwen2.5-7b-instruct.sh train|predict|merge  (see scripts/family.sh)
NAME=qwen2.5-7b-instruct TEMPLATE=auto LORA_CONFIG=lora_config_qwen2.json TRUST=
. "$(dirname "$0")/../family.sh"
