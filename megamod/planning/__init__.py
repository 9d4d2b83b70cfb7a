"""Memory and FLOPs of a distillation step per rank, and the parallel layouts that fit (tools/plan.py)."""
