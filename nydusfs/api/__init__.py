"""The nydusd HTTP control API on a unix socket (upstream's routes, statuses and error body).

``server`` (HTTP/1.1 over a unix socket, with limits and timeouts), ``routes`` (what each
route does to a ``Daemon``), ``types`` (request validation, response shapes), ``errors``
(status codes per error kind), ``prometheus`` (text exposition) and ``client`` (a synchronous
client for nydusctl and tests).
"""
