"""Human feedback: rank K samples of a policy per prompt on a local web page; each ranking is
appended to a K-wise preference file the reward stage reads (experiments/label.py).

python -m experiments.run --config=experiments/configs/label.py --workdir=runs/rlhf/label \
    --config.init_from=runs/rlhf/sft
# open the printed http://127.0.0.1:PORT/ ; Ctrl-C stops (rerun to continue), then e.g.
python -m experiments.run --config=experiments/configs/rlhf_reward.py --workdir=runs/rlhf/rm_human \
    --config.init_from=runs/rlhf/sft --config.data.path=runs/rlhf/label/preferences.jsonl
"""
from ml_collections import ConfigDict

from experiments.configs import rlhf_base


def get_config():
  c = ConfigDict()
  c.experiment = 'label'
  c.seed = 0
  c.init_from = 'runs/rlhf/sft'    # the policy whose samples are ranked
  c.prompts = rlhf_base.prompts()  # training line openings, unless prompts_file is set
  c.prompts_file = ''              # one prompt a line, or .jsonl with {"prompt": ...}
  c.out = ''                       # preference file; '' = WORKDIR/preferences.jsonl
  # samples ranked per prompt (InstructGPT: 4-9); batch_size rows per generation call
  c.rollout = rlhf_base.sampling(samples=4, batch_size=16)
  c.port = 8765                    # on 127.0.0.1 only; 0 = any free port (the URL is printed)
  c.max_items = 0                  # stop after this many rankings; 0 = when prompts run out
  c.queue = 4                      # items sampled ahead while the person reads
  c.mesh = rlhf_base.mesh()
  return c
