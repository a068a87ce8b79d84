#!/usr/bin/env bash
# Baichuan-13B-Chat (remote code): its <reserved_102>...<reserved_103> chat format.
# MODEL=/path/to/baichuan-13b-chat DATA=train.json TEST=test.json bash scripts/models/baichuan-13b-chat.sh train|predict|merge  (see scripts/family.sh)
NAME=baichuan-13b-chat TEMPLATE=baichuan LORA_CONFIG=lora_config_baichuan.json TRUST=--trust_remote_code
. "$(dirname "$0")/../family.sh"
