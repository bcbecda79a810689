import os

os.environ.setdefault("GRADBOOK_PROGRESS", "0")
