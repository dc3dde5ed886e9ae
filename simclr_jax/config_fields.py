"""Typed checks of single config fields, each failing in one sentence naming the fix.

The building blocks of `checks.py`: `integer(config, 'batch_size')`,
`real(...)`, `choice(...)` and the others read one (possibly dotted) field and
raise an `errors.UserError` such as

  --config.train.num_epochs=0 must be a positive whole number; set e.g. --config.train.num_epochs=1.

A field the config does not have reads as MISSING and passes: the predict and
audit configs hold only some fields.
"""

import math
import numbers

import jax

from simclr_jax import errors

MISSING = object()


def get(config, name):
  """config.a.b for name 'a.b', or MISSING where the config lacks the field."""
  value = config
  for part in name.split('.'):
    getter = getattr(value, 'get', None)
    if getter is None:
      return MISSING
    value = getter(part, MISSING)
    if value is MISSING:
      return MISSING
  return value


def show(value):
  """A value as written on the command line."""
  if isinstance(value, (tuple, list)):
    text = repr(tuple(value))
    quote = '"' if "'" in text else "'"
    return quote + text + quote
  return str(value)


def fail(name, value, expected, example=None):
  fix = f'; set e.g. --config.{name}={show(example)}' if example is not None else ''
  raise errors.UserError(f'--config.{name}={show(value)} {expected}{fix}.')


def is_int(value):
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value):
  return (isinstance(value, numbers.Real) and not isinstance(value, bool)
          and math.isfinite(value))


def integer(config, name, low=1, example=None, optional=False):
  """An integer field >= low (None too if optional)."""
  value = get(config, name)
  if value is MISSING or (optional and value is None):
    return
  if not is_int(value) or value < low:
    what = {0: 'a whole number >= 0', 1: 'a positive whole number'}.get(
        low, f'a whole number >= {low}')
    fail(name, value, f'must be {what}' + (' (or None)' if optional else ''),
         example if example is not None else max(low, 1))


def real(config, name, low=None, high=None, *, low_open=False, high_open=False,
          example=None, meaning='', optional=False):
  """A finite number field in the interval given by its bounds."""
  value = get(config, name)
  if value is MISSING or (optional and value is None):
    return
  ok = is_real(value)
  if ok and low is not None:
    ok = value > low if low_open else value >= low
  if ok and high is not None:
    ok = value < high if high_open else value <= high
  if ok:
    return
  if low == 0 and high is None:
    what = 'a positive number' if low_open else 'a number >= 0'
  elif high is None:
    what = f'a number {">" if low_open else ">="} {low:g}'
  else:
    what = (f'in {"(" if low_open else "["}{low:g}, {high:g}{")" if high_open else "]"}')
  fail(name, value, f'must be {what}{meaning}' + (' (or None)' if optional else ''),
        example)


def choice(config, name, choices, fix=None):
  value = get(config, name)
  if value is MISSING or value in choices:
    return
  fix = fix or f'set --config.{name} to one of {", ".join(map(str, choices))}'
  raise errors.UserError(f'Unknown {name} {value!r}; {fix}.')


def boolean(config, *names):
  for name in names:
    value = get(config, name)
    if value is not MISSING and not isinstance(value, bool):
      fail(name, value, 'must be True or False', True)


def integers(config, name, example, low=1, meaning=''):
  """A non-empty tuple of whole numbers >= low."""
  value = get(config, name)
  if value is MISSING:
    return
  if (not isinstance(value, (tuple, list)) or not value
      or not all(is_int(v) and v >= low for v in value)):
    what = 'positive whole numbers' if low == 1 else f'whole numbers >= {low}'
    fail(name, value, f'must be a non-empty tuple of {what}{meaning}', example)


def range_pair(config, name, high, example, meaning):
  """A (low, high) pair with 0 < low <= high (<= `high` unless None)."""
  value = get(config, name)
  if value is MISSING:
    return
  ok = (isinstance(value, (tuple, list)) and len(value) == 2
        and all(is_real(v) for v in value) and 0 < value[0] <= value[1]
        and (high is None or value[1] <= high))
  if not ok:
    bound = f' <= {high:g}' if high is not None else ''
    fail(name, value, f'must be a pair (low, high) with 0 < low <= high{bound}, '
          f'{meaning}', example)


def device_batch(config, name, example):
  """A global batch: positive and split evenly over every device."""
  value = get(config, name)
  if value is MISSING:
    return
  devices = jax.device_count()
  if not is_int(value) or value < 1 or value % devices:
    example = devices * max(1, round(example / devices))
    fail(name, value, f'must be a positive multiple of the {devices} device(s)', example)


def seeds(config, *names):
  for name in names:
    integer(config, name, low=0, example=0)


