"""Ray job: fine-tune one backbone on a cluster. A thin wrapper over `skinray train`.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/train.py --config configs/resnet50.yaml --data s3://BUCKET/dermnet \
            --out s3://BUCKET/runs --workers 8 --gpus-per-worker 1 --name resnet50-v1

Takes every option of `skinray train` (see README, "Jobs"). Resubmitting with the same --out and
--name resumes the run from its latest checkpoint. Expected: the run directory and best checkpoint
printed at the end; metrics per epoch in the job log and in OUT/NAME/tensorboard.
"""

import sys

from skinray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
