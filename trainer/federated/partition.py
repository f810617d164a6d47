"""Which training examples each federated client holds.

- `iid`: a seeded shuffle cut into equal shards (Flower Datasets' `IidPartitioner`, which shards
  contiguously, so the shuffle comes first: packaged corpora are in file order, i.e. by topic).
- `dirichlet`: per source, client shares drawn from Dirichlet(alpha) (Flower Datasets'
  `DirichletPartitioner` over the `source` field; small alpha, strong skew).
- `by_source`: whole sources per client, largest first onto the client holding least so far.
  Flower's `NaturalIdPartitioner` makes one client per source and `GroupedNaturalIdPartitioner`
  groups a fixed number of sources without balancing; neither gives exactly `num_clients` clients.

The source of an example is its row's `source` field (the topic file for
`packaged:chatterbot_qa`). Partitions are a pure function of the examples and the seed, so the
server and every client compute the same ones independently.
"""
from __future__ import annotations

from collections import Counter

from trainer.errors import UserError

SOURCE = "source"


def _sources(examples: list[dict], method: str) -> list:
    missing = sum(1 for e in examples if SOURCE not in e)
    if missing:
        raise UserError(f"{missing} of {len(examples)} training examples have no '{SOURCE}' field, which "
                        f"federated.partition={method} splits by", where="federated.partition",
                        hint="use federated.partition=iid, or data rows with a 'source' field (and data.packing=false)")
    return [e[SOURCE] for e in examples]


def partition(examples: list[dict], method: str, num_clients: int, seed: int, alpha: float = 0.5,
              min_size: int = 1) -> list[list[int]]:
    """Example indices of each client. Raises UserError if a client would get fewer than
    `min_size` examples."""
    import datasets  # imported here: the config schema must not pay for it

    if method == "iid":
        from flwr_datasets.partitioner import IidPartitioner

        ds = datasets.Dataset.from_dict({"index": list(range(len(examples)))}).shuffle(seed=seed)
        partitioner = IidPartitioner(num_partitions=num_clients)
        partitioner.dataset = ds
        parts = [sorted(partitioner.load_partition(i)["index"]) for i in range(num_clients)]
    elif method == "dirichlet":
        from flwr_datasets.partitioner import DirichletPartitioner

        labels = _sources(examples, method)
        ids = {s: i for i, s in enumerate(sorted(set(map(str, labels))))}
        ds = datasets.Dataset.from_dict({"index": list(range(len(examples))), SOURCE: [ids[str(s)] for s in labels]})
        partitioner = DirichletPartitioner(num_partitions=num_clients, partition_by=SOURCE, alpha=alpha,
                                           min_partition_size=min_size, self_balancing=False, seed=seed)
        partitioner.dataset = ds
        try:
            parts = [sorted(partitioner.load_partition(i)["index"]) for i in range(num_clients)]
        except ValueError as e:  # no draw gave every client min_size examples in its 10 attempts
            raise UserError(f"the Dirichlet split cannot give each of {num_clients} clients {min_size} examples "
                            f"({str(e).splitlines()[0]})", where="federated.alpha",
                            hint="raise federated.alpha, lower federated.num_clients or train.batch_size") from None
    elif method == "by_source":
        labels = [str(s) for s in _sources(examples, method)]
        sizes = Counter(labels)
        loads = [0] * num_clients
        owner = {}
        for source, size in sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0])):
            client = min(range(num_clients), key=lambda c: (loads[c], c))
            owner[source] = client
            loads[client] += size
        parts = [[] for _ in range(num_clients)]
        for i, source in enumerate(labels):
            parts[owner[source]].append(i)
        if len(sizes) < num_clients:
            raise UserError(f"{len(sizes)} sources cannot fill {num_clients} clients: {num_clients - len(sizes)} "
                            f"would be empty", where="federated.partition=by_source",
                            hint="lower federated.num_clients or use federated.partition=dirichlet")
    else:
        raise ValueError(f"unknown partition method {method!r}")
    small = [(i, len(p)) for i, p in enumerate(parts) if len(p) < min_size]
    if small:
        i, n = small[0]
        raise UserError(f"client {i} gets {n} training examples, fewer than one batch of {min_size} "
                        f"({len(small)} such client{'s' if len(small) > 1 else ''})", where=f"federated.partition={method}",
                        hint="lower federated.num_clients or train.batch_size, or add data")
    return parts
