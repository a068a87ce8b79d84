#!/usr/bin/env bash
# BLOOM-7B1 (base model): plain prompt format; query_key_value, dense and the MLP.
# MODEL=/path/to/bloom-7b1 DATA=train.json TEST=test.json bash scripts/models/bloom-7b1.sh train|predict|merge  (see scripts/family.sh)
NAME=bloom-7b1 TEMPLATE=default LORA_CONFIG=lora_config_bloom.json TRUST=
. "$(dirname "$0")/../family.sh"
