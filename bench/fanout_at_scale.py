"""A weight update at scale, calculated: bytes per link and update latency for unicast and for the
relay tree, at a given model size, number of rollout nodes and link speed (issue #14; a
calculation, not a measurement: these machines have one host).

    python bench/fanout_at_scale.py                       # 7B bf16, 64 nodes, 100 Gb/s links
    python bench/fanout_at_scale.py --params 70e9 --nodes 256 --link-gbit 400

The tree is the one the learner builds (`protocol.messages.relay_children`, the same code), and
the model of a transfer is store-and-forward by bucket, each host sending at its link's speed:

- unicast: rank 0 sends the whole update to each rollout in turn: latency = N * M / B.
- relay (fanout f): a bucket of S bytes takes f * S / B to leave a node with f children, so the
  busiest node (w children, w <= f) paces the stream at w * M / B, and the farthest rollout, `depth`
  hops from the learner, gets each bucket (depth - 1) * w * S / B after the root:
  latency = max(M, w * M) / B + (depth - 1) * w * S / B.

M: bytes per update, B: link bytes/s, S: bucket bytes, N: rollouts. Loading into the engine
overlaps the transfer (buckets are loaded as they arrive) and is left out.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from protocol.messages import relay_children


def tree_shape(nodes: int, fanout: int) -> tuple[int, int]:
    """(depth in hops from the learner to the farthest rollout, most children of one node) of the
    learner's relay tree over `nodes` rollouts."""
    deepest, widest = 1, 0

    def place(below: list[int], depth: int) -> None:
        nonlocal deepest, widest
        children = relay_children(below, fanout)
        widest = max(widest, len(children))
        for _, its in children:
            deepest = max(deepest, depth + 1)
            place(its, depth + 1)

    place(list(range(1, nodes)), 1)  # rollout 0 is the root, one hop from the learner
    return deepest, widest


@dataclass(frozen=True)
class Transfer:
    rank0_bytes: float  # what the learner's host sends per update
    busiest_link_bytes: float  # most bytes one host sends per update
    latency_s: float  # until the last rollout has every bucket


def unicast(update_bytes: float, nodes: int, link_bytes_s: float) -> Transfer:
    return Transfer(nodes * update_bytes, nodes * update_bytes, nodes * update_bytes / link_bytes_s)


def relay(update_bytes: float, nodes: int, link_bytes_s: float, bucket_bytes: float, fanout: int) -> Transfer:
    depth, widest = tree_shape(nodes, fanout)
    paced = max(widest, 1) * update_bytes / link_bytes_s  # the busiest node sends its stream
    fill = (depth - 1) * max(widest, 1) * bucket_bytes / link_bytes_s  # one bucket per hop before it
    latency = max(update_bytes / link_bytes_s, paced) + fill
    return Transfer(update_bytes, max(widest, 1) * update_bytes, latency)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", type=float, default=7e9, help="Model parameters (default 7e9).")
    p.add_argument("--bytes-per-param", type=float, default=2, help="2 for bf16 (default).")
    p.add_argument("--nodes", type=int, default=64, help="Rollout nodes (default 64).")
    p.add_argument("--link-gbit", type=float, default=100, help="Each host's link, Gbit/s (default 100).")
    p.add_argument("--bucket-mib", type=float, default=64, help="transport.weight_bucket_mb (default 64).")
    p.add_argument("--step-s", type=float, default=60, help="Seconds per training step, for the staleness column (default 60).")
    args = p.parse_args()
    m = args.params * args.bytes_per_param
    b = args.link_gbit * 1e9 / 8
    s = args.bucket_mib * 2**20
    rows = [("unicast (fanout 0)", unicast(m, args.nodes, b))]
    rows += [(f"relay, fanout {f}" + (" (chain)" if f == 1 else ""), relay(m, args.nodes, b, s, f)) for f in (1, 2, 4)]
    print(f"{args.params:.3g} parameters x {args.bytes_per_param:g} B = {m / 1e9:.1f} GB per update; "
          f"{args.nodes} rollout nodes; {args.link_gbit:g} Gbit/s links; {args.bucket_mib:g} MiB buckets; "
          f"{args.step_s:g} s per step\n")
    print("| path | tree depth | rank-0 GB sent | busiest host GB sent | update latency | latency / step |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, t in rows:
        depth = "-" if name.startswith("unicast") else tree_shape(args.nodes, int(name.split()[2]))[0]
        print(f"| {name} | {depth} | {t.rank0_bytes / 1e9:.0f} | {t.busiest_link_bytes / 1e9:.0f} | "
              f"{t.latency_s:.1f} s | {t.latency_s / args.step_s:.2f} |")


if __name__ == "__main__":
    main()
