"""Fit scaling laws to a finished sweep or to published points in a CSV.

python -m experiments.run --config=experiments/configs/scaling_fit.py --workdir=DIR --config.fit.csv=points.csv
"""
from ml_collections import ConfigDict


def get_config():
  c = ConfigDict()
  c.experiment = 'scaling_fit'
  c.fit = ConfigDict(dict(sweep_dir='', csv='', n_boot=200))
  return c
