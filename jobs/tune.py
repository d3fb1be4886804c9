"""Ray job: search one backbone's classification head with Ray Tune. A thin wrapper over `skinray tune`.

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/tune.py --backbone resnet50 --data s3://BUCKET/dermnet --out s3://BUCKET/tuning \
            --trials 32 --name resnet50-head

Takes every option of `skinray tune` (docs/tuning.md). Resubmitting with the same --out and
--name continues the search (finished trials are not rerun; the embeddings are reused). Expected
on 4 GPUs: the embedding job over DermNet's training images x 4 views takes a few minutes, then
trials of about a minute each, many at once. Outputs: OUT/NAME/trials.csv, trials.md,
best_config.yaml (for `jobs/train.py --config`), the embeddings and Tune's trial folders.
"""

import sys

from skinray.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
