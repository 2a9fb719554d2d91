"""Ray Serve's generated gRPC modules, the part a client uses: ``from
ray.serve.generated.serve_pb2 import HealthzRequest`` becomes ``from
tandem.generated.serve_pb2 import HealthzRequest``. Needs ``tandem-serve[grpc]``."""
