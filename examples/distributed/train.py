"""Sum one number per rank with ``torch.distributed.all_reduce`` over gloo, on CPU.

Every rank reads the variables torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``NODE_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``); ``init_process_group`` finds its peers
through them (``env://``). Rank r contributes r + 1, so every rank must see
``WORLD_SIZE * (WORLD_SIZE + 1) / 2``. Rank 0 writes ``result.json`` into the output folder.
Every rank logs the sum it saw with ``log_metrics`` (the record keeps rank 0's series).

    python train.py [--fail-rank N]   # rank N exits 3 before the all-reduce
"""

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")  # CPU torch, no numpy
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

try:
    from anylearn_sdk import log_metrics
except ImportError:  # anylearn_sdk not installed: nothing is logged

    def log_metrics(metrics, step=None):
        pass


def say(text: str) -> None:
    """One write per line, so lines of ranks sharing the task log never interleave."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fail-rank", type=int, default=-1)
    args = parser.parse_args()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    where = f"node {os.environ['NODE_RANK']} local rank {os.environ['LOCAL_RANK']}"
    host = os.environ.get("ANYLEARN_NODE_ID")  # the Ray node it runs on, on the Ray executor
    if rank == args.fail_rank:
        say(f"rank {rank} ({where}): failing on purpose")
        return 3
    dist.init_process_group("gloo")
    value = torch.tensor([float(rank + 1)])
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    expected = world * (world + 1) / 2
    on = f" on Ray node {host}" if host else ""
    total = f"all_reduce sum {value.item():g}, expected {expected:g}"
    say(f"rank {rank}/{world} ({where}): {total}{on}")
    log_metrics({"all_reduce_sum": value.item(), "rank": float(rank)}, step=0)
    dist.barrier()
    dist.destroy_process_group()
    if value.item() != expected:
        return 1
    if rank == 0:
        output = Path(os.environ.get("ANYLEARN_OUTPUT_DIR", "output"))
        output.mkdir(parents=True, exist_ok=True)
        result = {"world_size": world, "all_reduce_sum": value.item(), "torch": torch.__version__}
        (output / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
