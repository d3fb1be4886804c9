"""Ray job: health report of an archive (counts, imbalance, duplicates, unreadable files).

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/data_check.py s3://BUCKET/dermnet --json

Reads every file once in parallel Ray Data tasks; exits 1 when a file is unreadable or an image sits
in two splits. Idempotent (it only reads). Output: the report in the job log (--json: as JSON).
Expected runtime: DermNet (19,559 files) takes a few minutes on 16 cores, bound by object-store reads.
"""

import sys

from skinray.cli import main

if __name__ == "__main__":
    sys.exit(main(["data", "check", *sys.argv[1:]]))
