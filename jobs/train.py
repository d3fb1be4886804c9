"""Ray job: fine-tune one backbone on a cluster. A thin wrapper over `skinray train`.

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/train.py --config configs/resnet50.yaml --data s3://BUCKET/dermnet \
            --out s3://BUCKET/runs --workers 4 --gpus-per-worker 1 --name resnet50-v1

Takes every option of `skinray train` (docs/training.md). Resubmitting with the same --out and
--name resumes the run from its latest checkpoint. Outputs: OUT/NAME/ with checkpoints, config.yaml,
summary.json and tensorboard/; the best checkpoint is printed at the end. Expected runtime: DermNet
(12,446 training images) x 12 epochs is ~150,000 images: about 10 minutes on 4 x A10G when ~16 CPU
cores decode for them (estimated from the per-core ingest rate in docs/benchmarks.md; not measured
on GPUs here).
"""

import sys

from skinray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
