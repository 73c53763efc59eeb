"""The gate and the training view of gated attention (DESIGN §1)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ag_jax
from ag_jax.gate import straight_through
import numpy_reference
from conftest import spread_variables


@pytest.fixture(scope="module")
def gated(tiny_cfg, tiny_gate):
  model = ag_jax.Llama(tiny_cfg, gate=tiny_gate)
  return model, spread_variables(model, seed=0)


TOKENS = jnp.asarray(np.random.RandomState(3).randint(0, 64, size=(2, 12)))


def test_straight_through_forward_is_exactly_hard_and_backward_is_identity():
  prob = jnp.asarray(np.random.RandomState(0).uniform(size=1000), jnp.float32)
  hard = straight_through(prob, 0.5)
  assert set(np.unique(np.asarray(hard)).tolist()) <= {0.0, 1.0}
  np.testing.assert_array_equal(np.asarray(hard), np.asarray(prob > 0.5, np.float32))
  grad = jax.grad(lambda p: jnp.sum(straight_through(p, 0.5) * jnp.arange(1000.0)))(prob)
  np.testing.assert_array_equal(np.asarray(grad), np.arange(1000.0))


def test_untrained_gate_keeps_almost_everything(gated):
  model, variables = gated
  _, (probs, flags) = model.apply(variables, TOKENS, return_gates=True)
  assert probs.shape == flags.shape == (2, 2, 2, 12)  # [layers, B, kv_heads, T]
  assert abs(float(probs.mean()) - 0.95) < 0.02 and bool(flags.all())


def test_all_flags_one_equals_plain_llama(gated, tiny_cfg):
  model, variables = gated
  plain = ag_jax.Llama(tiny_cfg).apply(variables, TOKENS)
  ones = jnp.ones((2, 2, 2, 12), bool)
  forced = model.apply(variables, TOKENS, keep=ones)
  untrained = model.apply(variables, TOKENS)  # flags all 1 at init
  np.testing.assert_allclose(np.asarray(forced), np.asarray(plain), atol=1e-5)
  np.testing.assert_allclose(np.asarray(untrained), np.asarray(plain), atol=1e-5)


def test_random_forced_flags_match_numpy_reference(gated, tiny_cfg):
  model, variables = gated
  keep = np.random.RandomState(5).uniform(size=(2, 2, 2, 12)) < 0.5  # [L, B, K, T]
  ours = np.asarray(model.apply(variables, TOKENS, keep=jnp.asarray(keep)))
  for b in range(2):
    ref = numpy_reference.forward(variables["params"], tiny_cfg, np.asarray(TOKENS[b]), keep[:, b])
    np.testing.assert_allclose(ours[b], ref, atol=1e-4)
  # The flags matter: all-kept logits differ.
  plain = np.asarray(model.apply(variables, TOKENS, keep=jnp.ones_like(keep)))
  assert np.abs(plain - ours).max() > 1e-2


def test_gradients_reach_every_gate_parameter_and_are_finite(gated):
  model, variables = gated
  params = variables["params"]
  # Bias the gates to about half kept, so flags (and the STE path) are mixed.
  params = jax.tree_util.tree_map(lambda x: x, params)
  params["layers"]["gate"]["bias"] = jnp.zeros_like(params["layers"]["gate"]["bias"])
  weights = jax.random.normal(jax.random.key(1), (2, 12, 64))

  def loss(gate_params):
    p = {**params, "layers": {**params["layers"], "gate": gate_params}}
    return jnp.sum(model.apply({"params": p}, TOKENS) * weights)

  grads = jax.grad(loss)(params["layers"]["gate"])
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    g = np.asarray(g)
    assert np.isfinite(g).all(), path
    assert np.abs(g).max() > 0, f"no gradient reaches {jax.tree_util.keystr(path)}"


def test_gate_is_causal_and_respects_window(tiny_cfg):
  gate = ag_jax.GateConfig(num_heads=2, head_dim=8, window=4)
  model = ag_jax.Llama(tiny_cfg, gate=gate)
  variables = spread_variables(model, seed=2)
  base = np.random.RandomState(0).randint(0, 64, size=(1, 12))
  _, (p0, _) = model.apply(variables, jnp.asarray(base), return_gates=True)
  future = base.copy()
  future[0, 9] = (future[0, 9] + 1) % 64
  _, (p1, _) = model.apply(variables, jnp.asarray(future), return_gates=True)
  np.testing.assert_array_equal(np.asarray(p0[..., :9]), np.asarray(p1[..., :9]))
  assert np.abs(np.asarray(p0[..., 9:] - p1[..., 9:])).max() > 0
  # Layer 0's gate at position 8 sees positions 5..8 only (window 4): position 2 is invisible.
  past = base.copy()
  past[0, 2] = (past[0, 2] + 1) % 64
  _, (p2, _) = model.apply(variables, jnp.asarray(past), return_gates=True)
  np.testing.assert_allclose(np.asarray(p0[0, ..., 6:]), np.asarray(p2[0, ..., 6:]), atol=1e-6)
  assert np.abs(np.asarray(p0[0, ..., 2:6] - p2[0, ..., 2:6])).max() > 0


def test_linear_gate_and_packed_segments(tiny_cfg):
  gate = ag_jax.GateConfig(kind="linear", init_keep_prob=0.6)
  model = ag_jax.Llama(tiny_cfg, gate=gate)
  variables = spread_variables(model, seed=4)
  variables["params"]["layers"]["gate"]["out"] = 3.0 * variables["params"]["layers"]["gate"]["out"]
  assert set(variables["params"]["layers"]["gate"]) == {"out", "bias"}
  rng = np.random.RandomState(1)
  a, b = rng.randint(0, 64, 6), rng.randint(0, 64, 10)
  packed = jnp.asarray(np.concatenate([a, b])[None])
  seg = jnp.asarray([[1] * 6 + [2] * 10])
  pos = jnp.asarray([list(range(6)) + list(range(10))])
  out, (_, flags) = model.apply(variables, packed, pos, seg, return_gates=True)
  assert 0 < float(flags.mean()) < 1  # some tokens evicted: the segments test means something
  alone_b = model.apply(variables, jnp.asarray(b[None]))
  np.testing.assert_allclose(np.asarray(out[0, 6:]), np.asarray(alone_b[0]), atol=1e-5)


def test_gate_params_are_separate_and_small(gated, tiny_cfg):
  _, variables = gated
  params = variables["params"]
  gate_size = sum(x.size for x in jax.tree_util.tree_leaves(params["layers"]["gate"]))
  total = sum(x.size for x in jax.tree_util.tree_leaves(params))
  assert 0 < gate_size < total
  # The base model's params are exactly the plain Llama's.
  plain = ag_jax.init_variables(ag_jax.Llama(tiny_cfg), jax.random.key(0))
  without_gate = {**params, "layers": {k: v for k, v in params["layers"].items() if k != "gate"}}
  assert jax.tree_util.tree_structure(without_gate) == jax.tree_util.tree_structure(
      jax.tree_util.tree_map(lambda x: x, plain["params"]))
  assert dataclasses.is_dataclass(tiny_cfg)


def test_evicted_sink_gives_a_bounded_straight_through_gradient():
  """An evicted key whose logit dwarfs every visible one (a trained model's attention sink)
  must not produce an exploding flag gradient: it would drown all other gate gradients."""
  from pallas_kernels import gated_attention
  rng = np.random.default_rng(0)
  t, h = 6, 4
  q = jnp.asarray(rng.normal(size=(1, t, 1, 1, h)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(1, t, 1, h)), jnp.float32)
  k = k.at[0, 0, 0].set(q[0, :, 0, 0].sum(0) * 40.0)  # key 0: logits ~+30 above the rest
  v = jnp.asarray(rng.normal(size=(1, t, 1, h)), jnp.float32)
  pos, seg = jnp.arange(t)[None], jnp.ones((1, t), jnp.int32)
  keep = jnp.ones((1, 1, t)).at[0, 0, 0].set(0.0)  # the sink is evicted

  def loss(flags):
    return jnp.sum(gated_attention(q, k, v, pos, pos, seg, seg, flags, block_k=4) ** 2)

  grad = np.asarray(jax.grad(loss)(keep))
  assert np.all(np.isfinite(grad))
  # Each query row contributes at most 2 max|v| |d loss / d out| to a flag's gradient.
  bound = t * 2 * float(jnp.abs(v).max()) * 2 * t * float(jnp.abs(v).max())
  assert np.abs(grad).max() < bound, grad
  assert grad[0, 0, 0] != 0  # the sink's flag still learns that keeping it would matter


def test_gated_attention_gradients_equal_plain_softmax_attention():
  """With every flag kept, gradients w.r.t. q, k, v equal a plain jax.nn.softmax attention's
  (a clip on the exponent must never touch visible keys, not even at the row max)."""
  from pallas_kernels import gated_attention
  rng = np.random.default_rng(1)
  b, t, kv, g, h = 2, 5, 2, 2, 4
  q = jnp.asarray(rng.normal(size=(b, t, kv, g, h)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(b, t, kv, h)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(b, t, kv, h)), jnp.float32)
  allowed = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))

  def reference(q, k, v):
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", q, k) / np.sqrt(h)
    probs = jax.nn.softmax(jnp.where(allowed[:, None, None], logits, -jnp.inf), axis=-1)
    return jnp.einsum("BKGTS,BSKH->BTKGH", probs, v)

  def loss(fn):
    return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))

  want = jax.grad(loss(reference), argnums=(0, 1, 2))(q, k, v)
  for keep in (None, jnp.ones((b, kv, t))):
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    seg = jnp.ones((b, t), jnp.int32)
    got = jax.grad(loss(lambda q, k, v: gated_attention(q, k, v, pos, pos, seg, seg, keep,
                                                        block_k=2)),
                   argnums=(0, 1, 2))(q, k, v)
    for g_got, g_want in zip(got, want):
      np.testing.assert_allclose(np.asarray(g_got), np.asarray(g_want), atol=1e-5)


@pytest.mark.parametrize("preset,bound", [("llama3_8b", 0.03), ("llama3_2_1b", 0.06)])
def test_default_gate_cache_is_bounded_at_preset_shapes(preset, bound):
  """The default gate's k/v ring, computed (not allocated) at every context to 128k: at most
  3% (Llama-3-8B) / 6% (Llama-3.2-1B) of a full cache's bytes, and constant past its window."""
  from ag_jax.cache import full_kv_nbytes, gate_cache_nbytes
  cfg, gate = ag_jax.config.preset(preset), ag_jax.GateConfig()
  sizes = []
  for context in (128, 1000, 1024, 2048, 8192, 32768, 131072):
    ring = gate_cache_nbytes(gate, cfg.num_layers, 1, context, cfg.dtype)
    full = full_kv_nbytes(cfg.num_layers, 1, cfg.num_kv_heads, cfg.head_dim, context, cfg.dtype)
    assert ring <= bound * full, (context, ring / full)
    sizes.append(ring)
  assert sizes[2:] == [sizes[2]] * 5  # does not grow with the context past the window
  # The paper's layout (own k/v per head, whole context) would be 4x32/(8x128) = 12.5%.
  paper = dataclasses.replace(gate, num_kv_heads=None, head_dim=32, window=None)
  assert gate_cache_nbytes(paper, 1, 1, 4096, "bfloat16") == 2 * 4 * 32 * 4096 * 2


@pytest.mark.parametrize("num_kv_heads,dtype", [(1, "float32"), (2, "float32"), (1, "bfloat16")])
def test_gate_probabilities_match_numpy(tiny_cfg, num_kv_heads, dtype):
  """Layer 0's keep probabilities (its input is the embeddings, so eviction upstream cannot
  change them) against a loop-by-loop numpy gate: shared k/v heads, RoPE, causal window 5,
  k and v rounded to the cache dtype."""
  import ml_dtypes
  cfg = dataclasses.replace(tiny_cfg, dtype=dtype)
  gate_cfg = ag_jax.GateConfig(num_heads=4, num_kv_heads=num_kv_heads, head_dim=8, window=5)
  model = ag_jax.Llama(cfg, gate=gate_cfg)
  variables = spread_variables(model, seed=6)
  gate = variables["params"]["layers"]["gate"]
  gate["out"], gate["bias"] = gate["out"] * 100.0, jnp.zeros_like(gate["bias"])
  gate["q"], gate["k"], gate["v"] = gate["q"] * 10.0, gate["k"] * 10.0, gate["v"] * 10.0
  tokens = np.random.RandomState(2).randint(0, 64, size=(1, 11))
  _, (probs, _) = model.apply(variables, jnp.asarray(tokens), return_gates=True)
  p = variables["params"]
  g = {k: np.asarray(v[0], np.float64) for k, v in p["layers"]["gate"].items()}
  x = np.asarray(p["embed"], np.float64)[tokens[0]].astype(np.float32).astype(np.float64)
  if dtype == "bfloat16":
    x = np.asarray(p["embed"])[tokens[0]].astype(ml_dtypes.bfloat16).astype(np.float64)
  scale = np.asarray(p["layers"]["attn_norm"]["scale"][0], np.float64)
  h = scale * x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.rms_eps)
  if dtype == "bfloat16":
    h = h.astype(ml_dtypes.bfloat16).astype(np.float64)
  pos = np.arange(tokens.shape[1], dtype=np.float64)
  rnd = lambda a: a.astype(ml_dtypes.bfloat16).astype(np.float64) if dtype == "bfloat16" else a
  q = numpy_reference._rope(np.einsum("te,end->tnd", h, g["q"]), pos, cfg.rope_theta)
  k = rnd(numpy_reference._rope(np.einsum("te,end->tnd", h, g["k"]), pos, cfg.rope_theta))
  v = rnd(np.einsum("te,end->tnd", h, g["v"]))
  t, group = tokens.shape[1], 4 // num_kv_heads
  attended = np.zeros((t, 4, 8))
  for i in range(t):
    for n in range(4):
      seen = [j for j in range(t) if i - 5 < j <= i]
      s = np.array([q[i, n] @ k[j, n // group] for j in seen]) / np.sqrt(8)
      w = np.exp(s - s.max())
      attended[i, n] = (w / w.sum()) @ v[seen, n // group]
  logits = np.einsum("tnd,ndk->tk", attended, g["out"]) + g["bias"]
  expected = 1 / (1 + np.exp(-logits))  # [T, K]
  tol = 2e-2 if dtype == "bfloat16" else 1e-5
  print(f"{dtype}: max |gate prob - numpy| = {np.abs(np.asarray(probs[0, 0]).T - expected).max():.2e}")
  np.testing.assert_allclose(np.asarray(probs[0, 0]).T, expected, atol=tol)
  assert np.abs(expected - expected.mean()).max() > 10 * tol  # the probabilities vary
