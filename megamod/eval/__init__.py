"""Benchmark scoring of checkpoints: POPE-style yes/no, MMBench-style multiple choice (one forward per batch) and open
answers (greedy generation), with LLaVA's file layouts in and out.

Bottom up: formats.py, mme.py and pope_llava.py read the files into items; tasks.py names the tasks and their
readers; prompts.py writes the questions; metrics.py scores chosen answers; runner.py (forwards) and generate.py (KV
cache generation) run the model under any TP/PP/EP layout; scoring.py (choices, and `evaluate`, the entry of every
task at the current parallel layout) and captions.py (open answers) put them together; answers.py writes, reads,
merges and scores LLaVA's answer files; hf.py re-scores an HF export with transformers.
"""
