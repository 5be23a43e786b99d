"""``physai lego``: print decoded LEGO sentences with their answers."""
from __future__ import annotations

import argparse

from physai._argtypes import count


def add_parser(commands) -> None:
    parser = commands.add_parser("lego", help="generate LEGO sentences",
                                 description="Print LEGO sentences and the value of every variable.")
    parser.add_argument("--demo", action="store_true", help="print a few sentences (the default action)")
    parser.add_argument("-n", "--count", type=count, default=4, help="number of sentences")
    parser.add_argument("--n-vars", type=int, default=12)
    parser.add_argument("--group", default="z2", help="z2, z<k> or s3")
    parser.add_argument("--graph", default="chain", choices=("chain", "tree"))
    parser.add_argument("--components", type=int, default=1)
    parser.add_argument("--no-shuffle", action="store_true")
    parser.add_argument("--seed", type=count, default=0)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from physai.lego import LegoTask

    task = LegoTask(args.n_vars, args.group, args.graph, components=args.components, shuffle=not args.no_shuffle)
    batch = task.sample(args.count, seed=args.seed)
    print(task)
    for b in range(len(batch)):
        print(task.decode(batch.tokens[b]))
        answers = (f"{task.vocab[int(batch.tokens[b, p])]}={task.value_name(int(v))}(depth {d})"
                   for v, p, d in zip(batch.labels[b], batch.positions[b], batch.depth[b]))
        print("   ", "  ".join(answers))
    return 0
