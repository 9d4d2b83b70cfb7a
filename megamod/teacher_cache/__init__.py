"""The offline teacher: its outputs computed once (writer.py), stored (format.py) and read in training (reader.py)."""
