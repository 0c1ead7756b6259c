"""The embedded demo: DMD on scikit-learn's digits with a shipped tiny EDM teacher, on a CPU in minutes."""

from pathlib import Path

SHIPPED_TEACHER = Path(__file__).resolve().parent.parent / "assets" / "demo_teacher.pkl"
# The shipped teacher's sha256: `python -m dmd demo train-teacher` (TeacherConfig's recipe, SHIPPED_TEACHER_THREADS
# torch threads, torch 2.13 CPU on an AVX512 CPU) writes these bytes again, as benchmarks/demo_teacher.py checks; the
# same run limited to AVX2 kernels ends 0.01 away. tests/test_demo.py ties the file to this digest and TEACHER_KWARGS.
SHIPPED_TEACHER_SHA256 = "e4f2fbba12aa5d6c8b15680b9b5acd8cd7f5af450b87cd9852d60cfbfec80da6"
SHIPPED_TEACHER_THREADS = 1  # float sums are split across threads, so the thread count is part of the recipe
