"""Compile-only planning: does PRESET on MESH fit TARGET's memory, and at what cost per step?

python -m experiments.run --config=experiments/configs/aot.py --workdir=/tmp/aot \
    --config.model.preset=llama-7b --config.model.max_seq_len=4096 \
    --config.mesh.fsdp=8 --config.target=h100

Nothing is allocated: the train step is lowered and compiled on abstract inputs over fake
CPU devices, as many as the mesh has (experiments/aot.py). Writes WORKDIR/aot.json.
"""
from ml_collections import ConfigDict

from experiments.configs import base


def get_config():
  c = ConfigDict()
  c.experiment = 'aot'
  c.seed = 0
  # preset: a name from lm/presets.py ('' = the model section alone). Other model fields
  # that differ from ModelConfig's defaults override the preset's (e.g. max_seq_len=4096
  # turns llama-7b into LLaMA-2 7B's shape).
  c.model = base.model(preset='llama-7b', dtype='bfloat16', remat='full',
                       scan_unroll=1)   # a rolled layer scan: compile time flat in depth
  c.train = ConfigDict(dict(
      batch_size=0,    # global sequences per step; 0: one sequence per batch-axis device per microbatch
      seq_len=0,       # 0: model.max_seq_len
      grad_accum=1,    # microbatches per step (scan inside the step)
  ))
  c.optim = base.pretrain().optim
  # All sizes explicit (no -1): the mesh's product is the fake device count.
  c.mesh = ConfigDict(dict(data=1, fsdp=8, tensor=1, expert=1))
  c.target = 'h100'         # accelerator to check against; see experiments/aot.py TARGETS
  c.hbm_gib = 0.0           # > 0: override the target's memory per device (GiB)
  c.usable_fraction = 0.9   # of HBM the step may use (runtime, fragmentation, XLA's reserve)
  return c
