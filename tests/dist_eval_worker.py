"""Run under torch.distributed (2 processes): each rank writes the keys it evaluated."""
import json
import sys

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from zsadx.data.loaders import EvalShards
from zsadx.data.transforms import EvalTransform

dist.init_process_group("gloo")
root, out = sys.argv[1], sys.argv[2]
ds = EvalShards(root, dataset="kvasir", transform=EvalTransform(size=32))
keys = [k for b in DataLoader(ds, batch_size=3, num_workers=2) for k in b["key"]]
json.dump(keys, open(f"{out}/rank{dist.get_rank()}.json", "w"))
dist.barrier()
dist.destroy_process_group()
