"""Fit scaling laws to a sweep (or to an external CSV) and draw the figures.

  python -m experiments.run --config=experiments/configs/scaling_fit.py --workdir=DIR \
      --config.fit.sweep_dir=runs/scaling      # or --config.fit.csv=points.csv

Writes fits.json and loss_vs_n.png, isoflop.png, loss_vs_flops.png, optimal_allocation.png.
"""
from __future__ import annotations

import json
import os

from ml_collections import ConfigDict

from experiments.stages import scaling_fits
from lm import scaling
from lm.config import ConfigError


def run(config: ConfigDict, workdir: str):
  os.makedirs(workdir, exist_ok=True)
  f = config.fit
  if f.csv:
    try:
      pts = scaling.load_points_csv(f.csv)
    except (OSError, ValueError) as e:
      raise ConfigError(str(e)) from None
  elif f.sweep_dir:
    path = os.path.join(f.sweep_dir, 'sweep.json')
    if not os.path.exists(path):
      raise ConfigError(f'{path} does not exist; run the sweep first or point fit.sweep_dir at its workdir.')
    with open(path) as fh:
      results = json.load(fh)
    return scaling_fits.fit_and_plot(results, workdir, f.n_boot, curves=scaling_fits.loss_curves(results, f.sweep_dir))
  else:
    raise ConfigError('Give fit.csv (columns N, loss and D or FLOPs) or fit.sweep_dir.')
  return scaling_fits.fit_and_plot(pts, workdir, f.n_boot)
