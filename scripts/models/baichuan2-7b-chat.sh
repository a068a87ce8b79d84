#!/usr/bin/env bash
# Baichuan2-7B-Chat (remote code): its <reserved_106>...<reserved_107> chat format, no BOS.
# MODEL=/path/to/baichuan2-7b-chat DATA=train.json TEST=test.json bash scripts/models/baichuan2-7b-chat.sh train|predict|merge  (see scripts/family.sh)
NAME=baichuan2-7b-chat TEMPLATE=baichuan2 LORA_CONFIG=lora_config_baichuan2.json TRUST=--trust_remote_code
. "$(dirname "$0")/../family.sh"
