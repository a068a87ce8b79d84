#!/usr/bin/env bash
# Pythia-1.4B (base model): plain prompt format; query_key_value, dense and the MLP.
# MODEL=/path/to/pythia-1.4b DATA=train.json TEST=test.json bash scripts/models/pythia-1.4b.sh train|predict|merge  (see scripts/family.sh)
NAME=pythia-1.4b TEMPLATE=default LORA_CONFIG=lora_config_pythia.json TRUST=
. "$(dirname "$0")/../family.sh"
