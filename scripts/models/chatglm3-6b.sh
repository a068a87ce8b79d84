#!/usr/bin/env bash
# ChatGLM3-6B (remote code): [gMASK]sop <|user|> ... <|assistant|> prompts with its role tokens as single ids.
# MODEL=/path/to/chatglm3-6b DATA=train.json TEST=test.json bash scripts/models/chatglm3-6b.sh train|predict|merge  (see scripts/family.sh)
NAME=chatglm3-6b TEMPLATE=chatglm3 LORA_CONFIG=lora_config_chatglm3_6b.json TRUST=--trust_remote_code
. "$(dirname "$0")/../family.sh"
