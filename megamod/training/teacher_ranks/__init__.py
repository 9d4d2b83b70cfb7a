"""Online distillation with the teacher on its own ranks and layout (megamod/split_world.py: the split; launch.py:
starting either side; server.py: the teacher's ranks; client.py: the student's side; routes.py, rows.py and wire.py:
who sends what to whom, and how)."""
