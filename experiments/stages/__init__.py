"""The library the stage drivers stand on: sources and sharded setup (stage), the training
loop (trainer), the one online-RL loop (online), policy and reward-model opening (policy,
reward_model), logging (runlog), corpora (corpus) and each stage's data and evaluation helpers.

Rules: nothing here imports a driver (a module at the top of experiments/) or reads a config
file under experiments/configs; drivers import from here, from experiments/evaluation, and
from lm/, rl/ and data/."""
