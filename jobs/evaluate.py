"""Ray job: per-class evaluation of a bundle or trained model. A thin wrapper over `skinray evaluate`.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/evaluate.py --model s3://BUCKET/runs/resnet50-v1 --data s3://BUCKET/dermnet \
            --split test --out eval/resnet50-v1

Predicts through Ray Data actors on the cluster; writes report.json, report.md, the confusion
matrix (JSON, PNG) and the reliability diagram (PNG) to --out on the node that runs the job's driver.
"""

import sys

from skinray.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
