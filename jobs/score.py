"""Ray job: bulk-score an image archive to Parquet with a bundle. A thin wrapper over `skinray score`.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/score.py --model s3://BUCKET/bundles/dermnet-v1 --input s3://BUCKET/archive \
            --output s3://BUCKET/scores/archive-v1 --set score.max_actors=8 --set score.gpus_per_actor=1 \
            --set score.cpus_per_actor=1

Takes every option of `skinray score` (see README, "Bulk scoring"). Resubmitting with the same
--output resumes: rows already written are skipped, none is written twice. Expected: Parquet files
under OUTPUT/predictions/ (one row per input file) and OUTPUT/summary.json, whose counts the job
log also prints. Runtime: decode-bound; plan the CPU cores from the README's benchmarks.
"""

import sys

from skinray.cli import main

if __name__ == "__main__":
    sys.exit(main(["score", *sys.argv[1:]]))
