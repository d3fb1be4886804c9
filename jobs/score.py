"""Ray job: bulk-score an image archive to Parquet with a bundle. A thin wrapper over `skinray score`.

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/score.py --model s3://BUCKET/skinray/v1/bundle --input s3://BUCKET/archive \
            --output s3://BUCKET/scores/archive-v1 --set score.max_actors=8 --set score.gpus_per_actor=1 \
            --set score.cpus_per_actor=1

Takes every option of `skinray score` (docs/bundle-and-scoring.md). Resubmitting with the same
--output resumes: rows already written are skipped, none is written twice. Outputs: Parquet files
under OUTPUT/predictions/ (one row per input file) and OUTPUT/summary.json, whose counts the job log
also prints. Expected runtime: decoding runs at 133-300 images/s per CPU core at 224 px (measured
here, benchmarks/ingest.py), so 64 cores decode a million photos in one to two minutes; the GPU
actors and object-store reads bound it: estimated under 10 minutes per million photos with 8 GPU
actors (not measured on GPUs here).
"""

import sys

from skinray.cli import main

if __name__ == "__main__":
    sys.exit(main(["score", *sys.argv[1:]]))
