#!/usr/bin/env bash
# ChatGLM2-6B (remote code): [gMASK]sop + [Round N] 问：...答： prompts; query_key_value, dense, MLP.
# MODEL=/path/to/chatglm2-6b DATA=train.json TEST=test.json bash scripts/models/chatglm2-6b.sh train|predict|merge  (see scripts/family.sh)
NAME=chatglm2-6b TEMPLATE=chatglm2 LORA_CONFIG=lora_config_chatglm2_6b.json TRUST=--trust_remote_code
. "$(dirname "$0")/../family.sh"
