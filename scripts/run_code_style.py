"""Format or check the code style with ruff (configured in pyproject.toml): `format` or `check`."""

import subprocess
import sys

TARGETS = ["dmd", "scripts", "tests", "benchmarks", "setup.py"]


def run(args):
    """Run ruff with `args` on the project's folders; return its exit code."""
    return subprocess.call([sys.executable, "-m", "ruff", *args, *TARGETS])


def main(argv):
    if len(argv) != 1 or argv[0] not in ("format", "check"):
        print("usage: python -m scripts.run_code_style format|check", file=sys.stderr)
        return 2
    if argv[0] == "format":
        return run(["format"]) or run(["check", "--fix"])
    return run(["format", "--check"]) or run(["check"])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
