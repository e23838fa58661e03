"""How fast the GPUs of this machine sum a tensor across each other: what data-parallel training pays per optimizer
step to average its gradients (DDP all-reduces every trainable gradient once a step).

    torchrun --nproc-per-node 2 benchmarks/allreduce.py [--out OUT]

For each size, NCCL all-reduces an fp32 tensor 20 times after 5 warm-ups; reported are the mean time and the bus
bandwidth (NCCL's own measure: 2 (n - 1) / n bytes moved per byte of the tensor). The LoRA adapter of the seed
recipe on a Mistral-7B shape (r 16 on all seven projections, 41.9 M weights) is 168 MB of fp32 gradients.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

SIZES_MB = (1, 16, 64, 168, 512)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or ".")
    args = parser.parse_args()
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    rows = []
    for size_mb in SIZES_MB:
        tensor = torch.ones(size_mb * 2**20 // 4, device="cuda")
        for _ in range(5):
            dist.all_reduce(tensor)
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(20):
            dist.all_reduce(tensor)
        torch.cuda.synchronize()
        seconds = (time.perf_counter() - started) / 20
        bus_gb_s = size_mb * 2**20 * 2 * (world - 1) / world / seconds / 1e9
        rows.append({"megabytes": size_mb, "ms": round(seconds * 1e3, 3), "bus_GB_per_s": round(bus_gb_s, 1)})
    if rank == 0:
        result = {"gpus": world, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                  "nccl": ".".join(map(str, torch.cuda.nccl.version())), "all_reduce_fp32": rows}  # fmt: skip
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "allreduce.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
