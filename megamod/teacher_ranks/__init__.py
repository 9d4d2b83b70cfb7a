"""Online distillation with the teacher on its own ranks and layout (world.py: the split; server.py: the teacher's
ranks; client.py: the student's side; rows.py and wire.py: what travels between them)."""
