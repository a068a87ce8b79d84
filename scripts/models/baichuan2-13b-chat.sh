#!/usr/bin/env bash
# Baichuan2-13B-Chat (remote code, ALiBi, NormHead output layer): <reserved_106>...<reserved_107>, no BOS.
# MODEL=/path/to/baichuan2-13b-chat DATA=train.json TEST=test.json bash scripts/models/baichuan2-13b-chat.sh train|predict|merge  (see scripts/family.sh)
NAME=baichuan2-13b-chat TEMPLATE=baichuan2 LORA_CONFIG=lora_config_baichuan2.json TRUST=--trust_remote_code
. "$(dirname "$0")/../family.sh"
