"""The ray backend: each replica is a Ray actor, placed by Ray across a cluster. Every
module here imports Ray; only creating this backend loads them."""
