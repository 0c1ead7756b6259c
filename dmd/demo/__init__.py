"""The embedded demo: DMD on scikit-learn's digits with a shipped tiny EDM teacher, on a CPU in minutes."""

from pathlib import Path

SHIPPED_TEACHER = Path(__file__).resolve().parent.parent / "assets" / "demo_teacher.pkl"
