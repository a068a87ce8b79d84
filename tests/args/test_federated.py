"""fora/args/federated.py: the federated flags' defaults, which follow the other flags, and their mistakes."""

import pytest

from fora.args import FederatedArguments, parse_args
from fora.errors import UserError


def test_defaults_follow_the_other_flags():
    (args,) = parse_args((FederatedArguments,), [])
    assert (args.num_clients, args.local_steps, args.min_fit_clients, args.server_optimizer) == (2, 10, 2, "fedavgm")
    (args,) = parse_args((FederatedArguments,), ["--local_epochs", "1.5", "--num_clients", "4", "--min_fit_clients", "3"])
    assert (args.local_steps, args.local_epochs, args.min_fit_clients) == (None, 1.5, 3)
    (args,) = parse_args((FederatedArguments,), ["--partition", "files", "--client_files", " a.json, b.json,,c.json "])
    assert args.client_file_list() == ["a.json", "b.json", "c.json"]
    assert (args.num_clients, args.min_fit_clients) == (3, 3)  # one client per file


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--local_steps", "2", "--local_epochs", "1"], "give either --local_steps or --local_epochs, not both"),
        (["--partition", "files"], "--partition files needs --client_files a.json,b.json,..."),
        (["--client_files", "a.json"], "--client_files goes with --partition files"),
        (["--partition", "field:"], "--partition 'field:' is unknown; choose iid, dirichlet:ALPHA:NAME (ALPHA > 0), field:NAME or files"),
        (["--min_fit_clients", "3"], "--min_fit_clients must be between 1 and --num_clients 2, got 3"),
        (["--server_momentum", "1"], "--server_momentum must be in [0, 1), got 1.0"),
        (["--dp_clipping_norm", "1"], "differential privacy needs both --dp_noise_multiplier and --dp_clipping_norm"),
        (["--round_timeout", "0"], "--round_timeout must be positive, got 0.0"),
    ],
)
def test_mistakes_are_one_line(flags, message):
    with pytest.raises(UserError) as error:
        parse_args((FederatedArguments,), flags)
    assert str(error.value) == message


def test_partition_fraction_and_resume_flags_are_checked_in_one_line():
    from fora.args import FederatedArguments
    from fora.errors import UserError

    for partition in ("dirichlet:0.5", "dirichlet:-1:site", "dirichlet:x:site", "random"):
        try:
            FederatedArguments(partition=partition)
        except UserError as error:
            assert "choose iid, dirichlet:ALPHA:NAME (ALPHA > 0), field:NAME or files" in str(error)
        else:
            raise AssertionError(partition)
    assert FederatedArguments(partition="dirichlet:0.5:site").dirichlet() == (0.5, "site")
    assert FederatedArguments(num_clients=10, fraction_train=0.3).min_fit_clients == 3
    assert FederatedArguments(num_clients=10, fraction_train=0.3, min_fit_clients=5).clients_per_round() == 5
    for flags, message in (({"fraction_train": 0.0}, "--fraction_train must be in (0, 1]"),
                           ({"dp_delta": 1.0}, "--dp_delta must be in (0, 1)"),
                           ({"resume_from_round": "last"}, "--resume_from_round is auto or a round number"),
                           ({"client_gpus": -1.0}, "--client_gpus must not be negative")):
        try:
            FederatedArguments(**flags)
        except UserError as error:
            assert message in str(error)
        else:
            raise AssertionError(flags)
