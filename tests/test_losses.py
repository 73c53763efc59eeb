"""Losses and gate statistics against hand computations and explicit numpy loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ag_jax import losses
from ag_jax.config import GateConfig


def test_lm_loss_matches_numpy_and_ignores_masked_tokens():
  rng = np.random.RandomState(0)
  b, t, v = 2, 5, 7
  logits = rng.randn(b, t, v).astype(np.float32) * 3
  targets = rng.randint(0, v, (b, t)).astype(np.int32)
  mask = np.array([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]], np.float32)
  # Masked positions get absurd logits: they must not move the loss at all.
  logits_poisoned = logits.copy()
  logits_poisoned[mask == 0] = 1e4

  total, count = 0.0, 0
  for i in range(b):
    for j in range(t):
      if mask[i, j]:
        z = logits[i, j].astype(np.float64)
        log_z = np.log(np.sum(np.exp(z - z.max()))) + z.max()
        total += log_z - z[targets[i, j]]
        count += 1
  loss, n = losses.lm_loss(jnp.asarray(logits_poisoned), targets, mask)
  np.testing.assert_allclose(float(loss), total / count, rtol=1e-6)
  assert float(n) == count == 7


def test_lm_loss_of_an_all_masked_batch_is_zero_not_nan():
  loss, n = losses.lm_loss(jnp.ones((1, 3, 4)), jnp.zeros((1, 3), jnp.int32), jnp.zeros((1, 3)))
  assert float(loss) == 0.0 and float(n) == 0.0


def _probs_with_layer_means(means, valid, k=2, seed=0):
  """[L, B, K, T] probabilities whose mean over valid tokens and heads is exactly `means`;
  padding positions hold 1.0 so that counting them would show."""
  rng = np.random.RandomState(seed)
  b, t = valid.shape
  out = np.ones((len(means), b, k, t), np.float32)
  n = int(valid.sum()) * k
  for layer, m in enumerate(means):
    noise = rng.uniform(-0.1, 0.1, n)
    noise -= noise.mean()  # keeps the exact mean
    out[layer][np.broadcast_to(valid[:, None, :], (b, k, t))] = m + noise
  return out


VALID = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], bool)  # 5 real tokens, 3 padding


@pytest.mark.parametrize("kind, expected", [
    # layer means 0.8, 0.3, 0.6 against rho = 0.5, by hand:
    ("hinge", (0.3 ** 2 + 0.0 + 0.1 ** 2) / 3),
    ("l2", (0.3 ** 2 + 0.2 ** 2 + 0.1 ** 2) / 3),
    ("linear", (0.8 + 0.3 + 0.6) / 3),
])
def test_eviction_loss_by_hand(kind, expected):
  probs = _probs_with_layer_means([0.8, 0.3, 0.6], VALID)
  gate = GateConfig(target_keep=0.5, eviction_loss=kind)
  np.testing.assert_allclose(float(losses.eviction_loss(probs, VALID, gate)), expected, rtol=1e-5)


def test_layer_mean_prob_counts_valid_tokens_and_all_heads():
  rng = np.random.RandomState(3)
  probs = rng.uniform(size=(2, 2, 3, 4)).astype(np.float32)
  expected = [np.mean([probs[l, b, k, t] for b in range(2) for k in range(3) for t in range(4)
                       if VALID[b, t]]) for l in range(2)]
  np.testing.assert_allclose(losses.layer_mean_prob(probs, VALID), expected, rtol=1e-6)


def test_hinge_pushes_only_layers_above_target():
  probs = jnp.asarray(_probs_with_layer_means([0.8, 0.3], VALID))
  gate = GateConfig(target_keep=0.5, eviction_loss="hinge")
  grad = jax.grad(lambda p: losses.eviction_loss(p, VALID, gate))(probs)
  valid = np.broadcast_to(VALID[:, None, :], grad.shape[1:])
  assert np.all(np.asarray(grad[0])[valid] > 0)   # too many kept: push down
  assert np.all(np.asarray(grad[1]) == 0)         # below target: no force
  assert np.all(np.asarray(grad[0])[~valid] == 0)  # padding is never pushed
  l2 = GateConfig(target_keep=0.5, eviction_loss="l2")
  grad_l2 = jax.grad(lambda p: losses.eviction_loss(p, VALID, l2))(probs)
  assert np.all(np.asarray(grad_l2[1])[valid] < 0)  # l2 pulls a low layer back up


def test_keep_stats_by_explicit_counting():
  rng = np.random.RandomState(1)
  L, B, K, T = 3, 2, 2, 4
  probs = rng.uniform(size=(L, B, K, T)).astype(np.float32)
  flags = probs > 0.5
  stats = jax.tree.map(np.asarray, losses.keep_stats(probs, flags, VALID))
  per_head = np.zeros((L, K))
  for l in range(L):
    for k in range(K):
      kept = [flags[l, b, k, t] for b in range(B) for t in range(T) if VALID[b, t]]
      per_head[l, k] = np.mean(kept)
  np.testing.assert_allclose(stats["keep_ratio_per_head"], per_head, rtol=1e-6)
  np.testing.assert_allclose(stats["keep_ratio_per_layer"], per_head.mean(1), rtol=1e-6)
  np.testing.assert_allclose(stats["keep_ratio"], per_head.mean(), rtol=1e-6)
  mean_prob = np.mean([probs[l, b, k, t] for l in range(L) for b in range(B) for k in range(K)
                       for t in range(T) if VALID[b, t]])
  np.testing.assert_allclose(stats["mean_prob"], mean_prob, rtol=1e-6)
  assert stats["keep_ratio_per_head"].shape == (L, K)
