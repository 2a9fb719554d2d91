"""The replica: the user's object and the rules around it (admission, sync methods in
threads, batching, multiplexing, ASGI ingress, logs), and the host that runs one away
from the driver (a replica process or a Ray actor)."""
