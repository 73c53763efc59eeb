"""Plots of what the cache keeps: kept-ratio heatmaps, token keep maps, accuracy vs KV kept.

Figures are built with `matplotlib.figure.Figure` (no pyplot state, so importing this never
changes a notebook's backend) and written as PNG by the Agg renderer when `path` is given.
Each function returns its Figure; in a notebook, `display(fig)` shows it.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure


def _save(fig: Figure, path: str | None) -> Figure:
  if path is not None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, format="png", dpi=110)
  return fig


def kept_heatmap(kept_ratio, *, title: str = "kept ratio per layer and KV head",
                 path: str | None = None) -> Figure:
  """kept_ratio [L, K] in [0, 1] (e.g. GenerateResult.kept_ratio) -> layer x head heatmap."""
  kept = np.asarray(kept_ratio, np.float64)
  layers, heads = kept.shape
  fig = Figure(figsize=(1.2 + 0.55 * heads, 1.0 + 0.4 * layers), layout="constrained")
  ax = fig.add_subplot()
  image = ax.imshow(kept, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
  ax.set_xlabel("KV head")
  ax.set_ylabel("layer")
  ax.set_xticks(range(heads))
  ax.set_yticks(range(layers))
  if layers * heads <= 256:  # the numbers are readable: write them in
    for (l, k), value in np.ndenumerate(kept):
      ax.text(k, l, f"{100 * value:.0f}", ha="center", va="center", fontsize=7,
              color="white" if value < 0.6 else "black")
  fig.colorbar(image, ax=ax, label="kept / seen")
  ax.set_title(title)
  return _save(fig, path)


def keep_flags_from_cache(cache, row: int, num_tokens: int) -> np.ndarray:
  """[L, K, num_tokens] bool: which positions each layer and KV head of batch row `row`
  still holds (cache.position[l, row, k, :length])."""
  position, length = np.asarray(cache.position), np.asarray(cache.length)
  layers, _, heads = length.shape
  flags = np.zeros((layers, heads, num_tokens), bool)
  for l in range(layers):
    for k in range(heads):
      kept = position[l, row, k, :length[l, row, k]]
      flags[l, k, kept[kept < num_tokens]] = True
  return flags


def token_labels(tokenizer, ids: Sequence[int]) -> list[str]:
  """One short label per token (a byte-level model's characters), whitespace made visible."""
  labels = []
  for i in ids:
    text = tokenizer.decode([int(i)], skip_special=False)
    labels.append(text.replace(" ", "\u2423").replace("\n", "\u23ce") or "\u2205")
  return labels


def keep_map(flags, *, labels: Sequence[str] | None = None,
             title: str = "kept tokens per layer and KV head", path: str | None = None) -> Figure:
  """flags [L, K, T] bool (keep_flags_from_cache, or training-view flags of one sequence)
  -> one image row per (layer, head), one column per token; `labels` name the tokens
  (the prompt's characters for byte-level models) on the x axis."""
  flags = np.asarray(flags, bool)
  layers, heads, tokens = flags.shape
  grid = flags.reshape(layers * heads, tokens)
  fig = Figure(figsize=(min(2.0 + 0.12 * tokens, 40.0), 1.0 + 0.3 * layers * heads),
               layout="constrained")
  ax = fig.add_subplot()
  ax.imshow(grid, vmin=0, vmax=1, cmap="Greys", aspect="auto", interpolation="nearest")
  ax.set_yticks(range(layers * heads))
  ax.set_yticklabels([f"L{l} H{k}" for l in range(layers) for k in range(heads)], fontsize=7)
  if labels is not None:
    if len(labels) != tokens:
      raise ValueError(f"{len(labels)} labels for {tokens} tokens")
    ax.set_xticks(range(tokens))
    ax.set_xticklabels(list(labels), fontsize=6, fontfamily="monospace")
  ax.set_xlabel("token (black = kept)")
  ax.set_title(title)
  return _save(fig, path)


def accuracy_vs_kept(rows: Sequence[dict], metric: str = "accuracy", *, x: str = "kept",
                     title: str | None = None, path: str | None = None) -> Figure:
  """One line per policy through its (x, metric) points, sorted by x.

  rows: sweep rows (`ag_jax.evaluation.run_sweep`) with "policy", `x` (default "kept":
  the measured fraction of tokens kept) and `metric`.
  """
  fig = Figure(figsize=(6.0, 4.0), layout="constrained")
  ax = fig.add_subplot()
  for policy in dict.fromkeys(r["policy"] for r in rows):
    points = sorted((float(r[x]), float(r[metric])) for r in rows if r["policy"] == policy)
    xs, ys = zip(*points)
    style = "--" if len(points) == 1 else "-"
    ax.plot(xs, ys, style, marker="o", label=policy)
  ax.set_xlabel("fraction of KV kept" if x == "kept" else x)
  ax.set_ylabel(metric)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  ax.set_title(title or f"{metric} vs KV kept")
  return _save(fig, path)
