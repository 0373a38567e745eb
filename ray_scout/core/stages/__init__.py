"""One request at each end: the edge's work on a request and the cloud's work on a payload.

The edge takes a request to either a payload in the chosen mode or a local answer; the
cloud takes a payload to an answer. Each exists in full fidelity (the models of ``llm``)
and in profiled fidelity (a latency profile's times and a body of the payload's exact size),
behind one interface, so the actors never ask which fidelity they run. The choice of mode is
``control``'s; sockets and timing of arrivals are the actors'.
"""
