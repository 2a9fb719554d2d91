"""gRPC ingress, as Ray Serve's gRPC proxy serves it (``grpc_options``).

Only :mod:`.options` and :mod:`.metrics` import without grpcio; the rest is
imported when ``grpc_options`` name servicer functions.
"""
