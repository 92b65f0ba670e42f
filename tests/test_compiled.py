"""lm/compiled.Programs, the one cache of jitted programs: equal keys build once, a bound keeps
the newest entries, and the online loop's settings key is hashable and order-independent."""
from ml_collections import ConfigDict

from experiments.stages import compiled as stage_compiled
from lm import compiled


def test_equal_keys_build_once_and_the_bound_drops_the_oldest():
  built = []
  cache = compiled.Programs(max_entries=2)
  make = lambda name: (lambda: built.append(name) or name)
  assert cache.get(('a', 1), make('a')) == 'a' and cache.get(('a', 1), make('a2')) == 'a'
  cache.get('b', make('b'))
  cache.get(('a', 1), make('a3'))          # a is now the newest
  cache.get('c', make('c'))                # drops b, the oldest
  assert built == ['a', 'b', 'c'] and cache.count() == 2
  assert cache.get('b', make('b2')) == 'b2' and built[-1] == 'b2'


def test_frozen_config_is_a_hashable_key_independent_of_order():
  a = ConfigDict({'kl': {'coef': 0.1, 'estimator': 'k1'}, 'rollout': {'samples': 2}, 'x': 1})
  b = ConfigDict({'rollout': {'samples': 2}, 'kl': {'estimator': 'k1', 'coef': 0.1}, 'x': 2})
  ka = stage_compiled.frozen_config(a, ('kl', 'rollout', 'missing'))
  assert hash(ka) == hash(stage_compiled.frozen_config(b, ('kl', 'rollout')))
  b.kl.coef = 0.2
  assert ka != stage_compiled.frozen_config(b, ('kl', 'rollout'))
