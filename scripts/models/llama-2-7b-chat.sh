#!/usr/bin/env bash
# LLaMA-2-7B-Chat: [INST] ... [/INST] prompts; every attention and MLP projection.
# MODEL=/path/to/llama-2-7b-chat DATA=train.json TEST=test.json bash scripts/models/llama-2-7b-chat.sh train|predict|merge  (see scripts/family.sh)
NAME=llama-2-7b-chat TEMPLATE=llama2 LORA_CONFIG=lora_config_llama.json TRUST=
. "$(dirname "$0")/../family.sh"
