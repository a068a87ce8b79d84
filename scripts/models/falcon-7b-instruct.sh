#!/usr/bin/env bash
# Falcon-7B-Instruct: plain prompt format (no chat template); query_key_value, dense and the MLP.
# MODEL=/path/to/falcon-7b-instruct DATA=train.json TEST=test.json bash scripts/models/falcon-7b-instruct.sh train|predict|merge  (see scripts/family.sh)
NAME=falcon-7b-instruct TEMPLATE=default LORA_CONFIG=lora_config_falcon.json TRUST=
. "$(dirname "$0")/../family.sh"
