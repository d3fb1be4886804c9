"""Ray job: per-class evaluation of a bundle or trained model. A thin wrapper over `skinray evaluate`.

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/evaluate.py --model s3://BUCKET/skinray/v1/bundle --data s3://BUCKET/dermnet \
            --split test --out s3://BUCKET/skinray/v1/evaluation

Predicts through Ray Data actors on the cluster (`--set score.gpus_per_actor=1` for GPU actors) and
writes report.json, report.md, the confusion matrix (JSON, PNG) and the reliability diagram (PNG) to
--out (a folder or an object-store URI). Resubmitting rewrites the same report (idempotent).
Expected runtime: DermNet's 4,002 test images, decode-bound: about a minute with 16 CPU cores of
decoding and one GPU actor (estimated from benchmarks/score.py's per-core rate; not measured on GPUs).
"""

import sys

from skinray.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
