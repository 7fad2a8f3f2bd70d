"""Run a command and print its wall time and peak RSS as JSON: `python scripts/measure.py -- CMD...`.

A separate, tiny launcher: a child's ru_maxrss starts from the RSS of the process that forked
it, so the benchmark (which holds torch and tensors) must not fork the measured command itself.
"""

import json
import os
import subprocess
import sys
import time


def main() -> None:
    cmd = sys.argv[sys.argv.index("--") + 1:]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "max_rss": usage.ru_maxrss * 1024,
                      "cpu_seconds": usage.ru_utime + usage.ru_stime,  # less sensitive to a busy machine
                      "exit_code": os.waitstatus_to_exitcode(status)}), file=sys.stderr)


if __name__ == "__main__":
    main()
