"""Run a command and write its wall time in seconds to a file (bench/scale.py wraps stage commands
with it, so that DVC's own time is the repro's time minus the command's).

    python bench/_timed.py <file> <command> [args...]
"""

import subprocess
import sys
import time
from pathlib import Path

if __name__ == "__main__":
    out, cmd = Path(sys.argv[1]), sys.argv[2:]
    t = time.time()
    status = subprocess.call(cmd)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"{time.time() - t:.3f}\n")
    sys.exit(status)
