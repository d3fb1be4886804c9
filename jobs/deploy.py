"""Ray job: deploy a bundle as the online endpoint (Ray Serve) and return. A thin wrapper over
`skinray serve --detach`.

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/deploy.py --model s3://BUCKET/skinray/v1/bundle --host 0.0.0.0 \
            --set serve.gpus_per_replica=1 --set serve.max_replicas=4 \
            --set serve.api_keys_file=/run/secrets/skinray-keys

Takes every option of `skinray serve` (docs/serving.md). The application outlives the job
(Serve keeps it); resubmitting updates it in place (Serve rolls replicas only when a setting
changed). Expected: about a minute until every replica has loaded the bundle and answered its
warm-up batch; then GET /readyz on port 8000 of any node says ready. Put it behind your load
balancer with API keys set; the dashboard port stays private.
"""

import sys

from skinray.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", "--detach", *sys.argv[1:]]))
