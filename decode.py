#!/usr/bin/env python3
"""Batch generation with a physically evicting KV cache. `python decode.py --help` explains."""

import sys

from ag_jax.batch_decode import main

if __name__ == "__main__":
  sys.exit(main())
