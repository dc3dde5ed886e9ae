"""A linear probe of embeddings: ridge regression onto one-hot labels, in closed form.

How linearly separable are the classes in a pretrained encoder's embeddings? The
probe fits W minimising ||X W - Y||^2 + lam ||W||^2 on the labeled (training)
embeddings X, Y one-hot, and classifies a query by argmax x W. Embeddings are
L2-normalised (as the kNN monitor's cosine) and centred on the training mean, so
the intercept is the mean of Y; lam = `ridge` x the mean squared norm per feature (trace(X'X) / D),
which makes `ridge` independent of the embedding's width and scale.

Closed form, no training loop: the primal solve (D x D) when the embedding is
narrower than the training set, else the dual (N x N, X' (X X' + lam I)^-1 Y),
which is the same W. Runs where the arrays are (on the devices during pretraining;
float32, the products at full precision), so the 32,768-wide embeddings of the
`full` preset never leave the accelerator.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from simclr_jax.metrics import classification

RIDGE = 1e-3


def _normalise(x, mean=None):
  x = x.astype(jnp.float32)
  x = x / jnp.maximum(jnp.linalg.norm(x, axis=1, keepdims=True), 1e-12)
  mean = x.mean(0) if mean is None else mean
  return x - mean, mean


@functools.partial(jax.jit, static_argnames=('num_classes',))
def probe_predictions(train_x, train_y, query_x, num_classes, ridge=RIDGE):
  """Class predictions int32 [Q] of the ridge probe fitted on (train_x, train_y)."""
  x, mean = _normalise(train_x)
  q, _ = _normalise(query_x, mean)
  y = jax.nn.one_hot(train_y, num_classes, dtype=jnp.float32)
  n, d = x.shape
  highest = jax.lax.Precision.HIGHEST
  lam = ridge * jnp.maximum(jnp.sum(x * x) / d, 1e-12)
  if d <= n:
    gram = jnp.matmul(x.T, x, precision=highest) + lam * jnp.eye(d)
    w = jnp.linalg.solve(gram, jnp.matmul(x.T, y, precision=highest))
  else:
    gram = jnp.matmul(x, x.T, precision=highest) + lam * jnp.eye(n)
    w = jnp.matmul(x.T, jnp.linalg.solve(gram, y), precision=highest)
  # The intercept of centred inputs is the targets' mean (the class shares).
  scores = jnp.matmul(q, w, precision=highest) + y.mean(0)
  return jnp.argmax(scores, axis=1).astype(jnp.int32)


def probe_monitor(train_embeddings, train_labels, query_embeddings, query_labels,
                  num_classes, ridge=RIDGE):
  """{'probe_accuracy', 'probe_balanced_accuracy'} of the linear probe on the queries."""
  predictions = np.asarray(probe_predictions(
      jnp.asarray(train_embeddings), jnp.asarray(train_labels, jnp.int32),
      jnp.asarray(query_embeddings), num_classes, ridge))
  m = classification.metrics_from_confusion(classification.confusion_matrix(
      np.asarray(query_labels), predictions, num_classes))
  return {'probe_accuracy': m['accuracy'], 'probe_balanced_accuracy': m['balanced_accuracy']}
