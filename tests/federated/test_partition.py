"""fora/federated/partition.py: which records each client trains on, and in which order across rounds."""

from fora.federated.run import parse


def test_client_rounds_go_through_every_record_before_any_repeats():
    """Round r takes records (r-1)*k .. r*k-1 of one stream of seeded shuffled passes: every pass is a
    permutation, passes differ, a round may straddle two passes, and the same seed gives the same stream."""
    from fora.federated.partition import round_indices

    num_records, per_round = 10, 4
    stream = [i for r in range(1, 11) for i in round_indices(num_records, per_round, r, seed=7)]
    passes = [stream[i:i + num_records] for i in range(0, len(stream), num_records)]
    assert all(sorted(p) == list(range(num_records)) for p in passes)
    assert passes[0] != passes[1]
    assert round_indices(num_records, per_round, 3, seed=7) == passes[0][8:] + passes[1][:2]
    assert round_indices(num_records, per_round, 3, seed=7) != round_indices(num_records, per_round, 3, seed=8)
    fewer_records_than_a_round = round_indices(3, 4, 1, seed=7)
    assert len(fewer_records_than_a_round) == 4 and sorted(fewer_records_than_a_round[:3]) == [0, 1, 2]


def test_a_simulated_client_reads_its_own_client_file(tmp_path):
    """--partition files: client N trains on the N-th --client_files entry (not on a share of --train_file)."""
    from fora.federated.partition import simulated_client_file

    common = ["--output_dir", str(tmp_path / "out"), "--num_clients", "2"]
    run = parse([*common, "--partition", "files", "--client_files", "a.json,b.json"])
    assert [simulated_client_file(run, client) for client in (0, 1)] == ["a.json", "b.json"]
    run = parse([*common, "--train_file", "data/train.json"])
    assert simulated_client_file(run, 1) == str(tmp_path / "out" / "partitions" / "client-1.jsonl")


def test_partitions_are_seeded_disjoint_and_by_field_keep_each_value_on_one_client():
    from fora.data.records import Record
    from fora.federated.partition import split_by_field, split_iid

    shares = split_iid(10, 3, seed=1)
    assert sorted(i for s in shares for i in s) == list(range(10)) and sorted(map(len, shares)) == [3, 3, 4]
    assert split_iid(10, 3, seed=1) == shares and split_iid(10, 3, seed=2) != shares
    records = [Record(f"f: line {i}", {"site": site}) for i, site in enumerate("aabbbcaab")]
    shares = split_by_field(records, "site", 2)
    assert sorted(i for s in shares for i in s) == list(range(9))
    for share in shares:
        sites = {records[i].value["site"] for i in share}
        assert all(records[i].value["site"] not in sites for other in shares if other is not share for i in other)


def test_dirichlet_shares_follow_alpha_and_are_seeded():
    """--partition dirichlet:ALPHA:NAME (Flower Datasets' DirichletPartitioner): every record once, every client
    at least one, the same draw for the same seed; a small ALPHA concentrates each value on few clients."""
    from fora.data.records import Record
    from fora.federated.partition import split_dirichlet

    records = [Record(f"f: line {i}", {"site": "abcd"[i % 4]}) for i in range(80)]

    def purity(shares) -> float:  # the mean share of a client's records that carry its most common value
        counts = [[sum(records[i].value["site"] == v for i in share) for v in "abcd"] for share in shares]
        return sum(max(c) / sum(c) for c in counts) / len(counts)

    skewed = split_dirichlet(records, "site", 0.05, 3, seed=1)
    even = split_dirichlet(records, "site", 1000.0, 3, seed=1)
    for shares in (skewed, even):
        assert sorted(i for s in shares for i in s) == list(range(80)) and all(shares)
    assert split_dirichlet(records, "site", 0.05, 3, seed=1) == skewed != split_dirichlet(records, "site", 0.05, 3, seed=2)
    assert purity(skewed) > 0.8 and purity(even) < 0.5

