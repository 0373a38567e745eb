"""Framed TCP between edge agents and the cloud: the data plane of the testbed.

- ``framing``: the envelope (magic, version, type, request id, deadline budget, lengths,
  checksums) around an opaque body; decoding from a stream with a size limit.
- ``server``: a threaded server that hands each request to a handler and answers it,
  honouring deadlines and cancellation with bounded memory per connection.
- ``client``: a persistent connection that sends one request at a time under a deadline
  and records when the bytes left, were acknowledged and came back.
- ``netns``: sockets created inside a named network namespace by a thread of our own.

The body is the core's wire format; this package never parses it. Standard library only.
"""
