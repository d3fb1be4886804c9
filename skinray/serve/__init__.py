"""Online scoring on Ray Serve: the bundle behind an HTTP ingress (/v1, the Open Inference Protocol
at /v2, the upload page) and batched model deployments.

    app.py         build_app: the deployments, their batching, autoscaling and limits (the import
                   path `skinray.serve.app:build_app` that Serve configs name)
    ingress.py     what a request goes through in the ingress: decode, the models, the answer
    guards.py      what every route shares: body limit, API keys, JSON errors, metrics
    routes_v1.py   the /v1 routes, health and the page
    routes_oip.py  the Open Inference Protocol (KServe v2) routes and tensor codec
    command.py     `skinray serve`: the foreground server and its Serve config file
"""
