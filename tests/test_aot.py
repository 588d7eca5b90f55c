"""tools/aot_compile.py: per-device bytes match the analysis; the planner's choice fits."""

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent.parent / 'tools'))
import aot_compile  # noqa: E402
from test_config import load  # noqa: E402

P7B = 6_738_415_616


def test_7b_state_bytes_per_device_match_analysis():
  est = aot_compile.estimate(load('configs/7b.py'), per_device_batch=1, remat='full')
  # float32 params + AdamW mu and nu = 12 bytes per parameter, split over fsdp=8.
  assert (est.params_bytes + est.opt_bytes) == pytest.approx(12 * P7B / 8, rel=0.01)
  assert est.total_bytes > est.params_bytes + est.opt_bytes + est.grad_bytes
  assert est.model_flops > 6 * P7B * 4096  # at least 6 N per token


def test_planner_top_choice_fits_the_budget():
  ranked = aot_compile.plan(load('configs/7b.py'), batches=[1, 2], remats=['full'],
                            budget_gib=80)
  best = ranked[0]
  assert best.fits(80) and best.total_bytes < 80 * aot_compile.GIB
  assert all(not e.fits(80) or e.tokens_per_step <= best.tokens_per_step for e in ranked)
