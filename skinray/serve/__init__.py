"""Online scoring on Ray Serve: the bundle behind an HTTP ingress (/v1, the Open Inference Protocol
at /v2, the upload page) and batched model deployments.

    app.py      build_app: the deployments, their batching, autoscaling and limits
    service.py  what a request goes through in the ingress: decode, the models, the answer
    http.py     the request guards shared by every route: body limit, API keys, JSON errors, metrics
    api.py      the /v1 routes
    oip.py      the Open Inference Protocol (KServe v2) routes and tensor codec
    command.py  `skinray serve`: the foreground server and its Serve config file
"""
