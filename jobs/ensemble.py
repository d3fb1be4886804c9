"""Ray job: calibrate trained members into one versioned bundle. A thin wrapper over `skinray ensemble`.

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/ensemble.py --members s3://BUCKET/runs/resnet50-v1 s3://BUCKET/runs/inception-v1 \
            s3://BUCKET/runs/effnet-v1 --data s3://BUCKET/dermnet --out s3://BUCKET/bundles/dermnet-v1

Takes every option of `skinray ensemble` (docs/bundle-and-scoring.md). Runtime: the members'
predictions on the validation split (about 3,100 DermNet images; minutes on one GPU actor) plus
seconds of fitting. Expected: the bundle folder with bundle.json, and its version printed. A bundle
is never overwritten: resubmitting the same members to the same --out finds their bundle and changes
nothing; other members there are refused, so give each version its own path.
"""

import sys

from skinray.cli import main

if __name__ == "__main__":
    sys.exit(main(["ensemble", *sys.argv[1:]]))
