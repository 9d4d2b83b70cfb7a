"""Benchmark scoring of checkpoints: POPE-style yes/no and MMBench-style multiple choice, by one forward per batch.

formats.py reads the files (see its docstring for the formats), scoring.py builds prompts, picks answers and computes
the metrics (`evaluate(ckpt, task, data, ...)`), runner.py runs the batched forwards under any TP/PP/EP layout.
"""
