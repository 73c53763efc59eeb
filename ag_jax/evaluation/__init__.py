"""Evaluation under KV eviction: teacher-forced scoring and perplexity through the cache,
recall accuracy, multiple-choice log-likelihood on TFDS data sets, sweeps over policies and
budgets. `python -m ag_jax.evaluate --help` is the command line."""

from ag_jax.evaluation.scoring import CacheStats, perplexity, resolve_setting, score_continuations
from ag_jax.evaluation.sweep import (DEFAULT_POLICIES, markdown_table, parse_policy, run_sweep,
                                     write_results)
from ag_jax.evaluation.tasks import (MC_ALIASES, MC_FORMATS, MCExample, MultipleChoiceTask,
                                     PerplexityTask, RecallTask, load_multiple_choice, mc_format,
                                     recall_accuracy)

__all__ = [
    "CacheStats", "DEFAULT_POLICIES", "MCExample", "MC_ALIASES", "MC_FORMATS",
    "MultipleChoiceTask", "PerplexityTask", "RecallTask", "load_multiple_choice",
    "markdown_table", "mc_format", "parse_policy", "perplexity", "recall_accuracy",
    "resolve_setting", "run_sweep", "score_continuations", "write_results",
]
