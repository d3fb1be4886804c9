"""Ray job: archive to evaluated bundle in one submission. A thin wrapper over `skinray pipeline`.

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/pipeline.py --data s3://BUCKET/dermnet --out s3://BUCKET/skinray/v1 --gpu \
            --set train.workers=4

Checks the archive, searches each member's head (Ray Tune, cached embeddings), trains the three
members (configs/resnet50.yaml, inception_v3.yaml, efficientnetv2s.yaml; --members to change),
calibrates them into one bundle and evaluates it beside its members on the test split. Resubmitting
the same command continues: finished stages are skipped, a cut-off search or run resumes.
Expected runtime on 4 x A10G + 2 x 32-core CPU nodes, DermNet: about an hour (estimated from the
per-core ingest rate measured here and ~150,000 training images per member; not measured on GPUs).
Outputs under --out: check.json, tune/MEMBER/best_config.yaml, runs/MEMBER/ (checkpoints,
TensorBoard), bundle/ (serve it with jobs/deploy.py), evaluation/report.md.
"""

import sys

from skinray.cli import main

if __name__ == "__main__":
    sys.exit(main(["pipeline", *sys.argv[1:]]))
