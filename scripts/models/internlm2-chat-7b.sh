#!/usr/bin/env bash
# InternLM2-Chat-7B (remote code): <|im_start|>user ... <|im_end|> prompts; fused wqkv, wo, w1-w3.
# MODEL=/path/to/internlm2-chat-7b DATA=train.json TEST=test.json bash scripts/models/internlm2-chat-7b.sh train|predict|merge  (see scripts/family.sh)
NAME=internlm2-chat-7b TEMPLATE=internlm2 LORA_CONFIG=lora_config_internlm2.json TRUST=--trust_remote_code
. "$(dirname "$0")/../family.sh"
