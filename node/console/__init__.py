"""The administrators' console served by the node (issue 15): so far the monitoring endpoints,
``/metrics`` (Prometheus), ``/healthz`` and ``/readyz``; the web pages and their login come next."""
