"""Plots draw exactly the data they are given and write PNG files."""

import types

import numpy as np
import pytest

from ag_jax import plots
from ag_jax.tokenizer import ByteTokenizer

PNG = b"\x89PNG\r\n\x1a\n"


def read_png_size(path):
  with open(path, "rb") as f:
    head = f.read(24)
  assert head[:8] == PNG
  return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")  # IHDR w, h


def test_kept_heatmap(tmp_path):
  kept = np.array([[1.0, 0.5], [0.25, 0.0], [0.75, 0.1]])  # [L=3, K=2]
  path = tmp_path / "kept.png"
  fig = plots.kept_heatmap(kept, path=str(path))
  ax = fig.axes[0]
  np.testing.assert_array_equal(ax.images[0].get_array(), kept)
  assert ax.images[0].get_clim() == (0.0, 1.0)
  assert sorted(t.get_text() for t in ax.texts) == sorted(["100", "50", "25", "0", "75", "10"])
  assert (ax.get_xlabel(), ax.get_ylabel()) == ("KV head", "layer")
  width, height = read_png_size(path)
  assert width > 50 and height > 50


def test_keep_flags_from_cache_and_keep_map(tmp_path):
  # 2 layers, batch 2, 2 heads, 5 slots; garbage past each row's length must be ignored.
  position = np.full((2, 2, 2, 5), 3)
  length = np.zeros((2, 2, 2), int)
  position[0, 1, 0, :3], length[0, 1, 0] = [0, 2, 5], 3  # position 5 is past num_tokens
  position[1, 1, 1, :2], length[1, 1, 1] = [1, 4], 2
  cache = types.SimpleNamespace(position=position, length=length)
  flags = plots.keep_flags_from_cache(cache, row=1, num_tokens=5)
  expected = np.zeros((2, 2, 5), bool)
  expected[0, 0, [0, 2]] = True
  expected[1, 1, [1, 4]] = True
  np.testing.assert_array_equal(flags, expected)

  tok = ByteTokenizer()
  ids = tok.encode("a b\n")  # BOS + 4 bytes = 5 tokens
  labels = plots.token_labels(tok, ids)
  assert labels == ["<s>", "a", "\u2423", "b", "\u23ce"]
  fig = plots.keep_map(flags, labels=labels, path=str(tmp_path / "map.png"))
  ax = fig.axes[0]
  np.testing.assert_array_equal(ax.images[0].get_array(), expected.reshape(4, 5))
  assert [t.get_text() for t in ax.get_xticklabels()] == labels
  assert [t.get_text() for t in ax.get_yticklabels()] == ["L0 H0", "L0 H1", "L1 H0", "L1 H1"]
  read_png_size(tmp_path / "map.png")
  with pytest.raises(ValueError, match="4 labels for 5 tokens"):
    plots.keep_map(flags, labels=labels[:4])


def test_accuracy_vs_kept_draws_one_sorted_line_per_policy(tmp_path):
  rows = [
      {"policy": "h2o", "kept": 0.5, "accuracy": 0.8},
      {"policy": "h2o", "kept": 0.25, "accuracy": 0.4},
      {"policy": "ag", "kept": 0.3, "accuracy": 0.9},
      {"policy": "full", "kept": 1.0, "accuracy": 1.0},
      {"policy": "ag", "kept": 0.12, "accuracy": 0.7},
  ]
  fig = plots.accuracy_vs_kept(rows, path=str(tmp_path / "curve.png"))
  ax = fig.axes[0]
  lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
           for line in ax.get_lines()}
  assert lines == {"h2o": ([0.25, 0.5], [0.4, 0.8]), "ag": ([0.12, 0.3], [0.7, 0.9]),
                   "full": ([1.0], [1.0])}
  assert [t.get_text() for t in ax.get_legend().get_texts()] == ["h2o", "ag", "full"]
  assert ax.get_ylabel() == "accuracy" and ax.get_xlabel() == "fraction of KV kept"
  read_png_size(tmp_path / "curve.png")
