"""Federated fine-tuning on Flower: sites train adapters where their data lives; only adapters travel.

    server (ServerApp)                          each client (ClientApp)
    global adapter ──── adapter tensors ────▶   load it into its own base model (once per process: per run in
                                                simulation, per round when deployed)
                                                train --local_steps with fora.training.SupervisedTrainer
    example-weighted mean ◀── adapter tensors ─ (+ FedProx's mu/2·||w − w_global||², ClientTrainer)
    then FedAvgM's step, or AdamW on the mean change (--server_optimizer adamw: clients take SGD steps)
    save OUTPUT_DIR/round-N (PEFT + fora_run.json), eval loss (+ ROUGE-L/BLEU-4), federated_history.json

The same two apps run in Flower's simulation engine (simulation.py: one machine, clients in Ray
workers) and in its deployment engine (`client_app.app` and `server_app.app`, loaded by a SuperLink and
one SuperNode per site). The flags reach the apps as an argument list: in simulation directly; in
deployment as the run config's `flags` (training settings, the only ones a site accepts) and
`server-flags` (the server's own), with everything that touches a site (its data, base model, remote
code, cache, device) in its SuperNode's `--node-config`.

    run.py         the run's flags, what travels (adapter tensors) and the model every participant loads
    partition.py   which records each client trains on, and in which order across rounds
    client_app.py  the ClientApp: a site's local training (ClientTrainer, FedProx)
    strategy.py    the server's aggregation (FedAvgM, or AdamW on the server), its failure bookkeeping, and
                   differential privacy with the privacy spent
    server_app.py  the ServerApp: the global adapter, saved and evaluated every round, and the history
    resume.py      what the server saves after every round so that a stopped run goes on (--resume_from_round)
    simulation.py  train_federated.py: everything checked, then the simulation engine
"""
