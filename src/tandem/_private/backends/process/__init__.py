"""The process backend: each replica is a child process on this machine, reached over
Unix sockets (framing, a mutual handshake, many requests per connection)."""
