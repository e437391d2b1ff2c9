import sys
from pathlib import Path

# tests import their small shared builders (tiny.py, models.py) by module name
sys.path.insert(0, str(Path(__file__).parent))
